// bun-nbd's public API: the NBD client library, plus the pieces needed to embed the server.
export * from "./client/index.ts";
export { NbdServer, type ServerOptions } from "./server/server.ts";
export { createLogger, type Logger } from "./server/log.ts";
export { openExports, type OpenOptions } from "./devices/open.ts";
export { RawFile } from "./devices/file.ts";
export { MemoryDevice } from "./devices/memory.ts";
export { Passthrough } from "./devices/passthrough.ts";
export * from "./devices/types.ts";
