// Image inspection: partition tables, file systems and boot records parsed over a small "read N
// bytes at offset" interface (ByteSource), so one implementation inspects local files, device
// stacks and any NBD export. Pure parsers: nothing here opens files or sockets.
export { inspect, type InspectOptions } from "./inspect.ts";
export { type ByteSource, Reader, MAX_READ } from "./reader.ts";
export { sniffContainer, qcow2Header } from "./container.ts";
export { size as formatBytes, formatReport, summary, qemuLine, mediaKind, fsText, isBootable } from "./format.ts";
export { floppyFor, chs, FLOPPIES } from "./floppy.ts";
export type * from "./types.ts";
