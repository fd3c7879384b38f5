// Decoding descriptor files (CUE sheets, CloneCD .ccd) into bounded lines: BOMs, CR/LF/CRLF,
// ^Z/NUL padding at EOF, and a clear error for binary garbage or absurd sizes. Cold code.

/** Largest descriptor we read; real sheets are a few KiB (99 tracks fit in ~10 KiB). */
export const MAX_DESCRIPTOR_BYTES = 1024 * 1024;
/** Longest line accepted. */
export const MAX_LINE = 4096;

/** Decodes descriptor bytes to text: UTF-8 (BOM stripped), UTF-16 with a BOM, else windows-1252. */
export function decodeDescriptor(bytes: Uint8Array, label: string): string {
  if (bytes.length > MAX_DESCRIPTOR_BYTES) {
    throw new Error(`${label}: ${bytes.length} bytes is too large for a disc descriptor (limit ${MAX_DESCRIPTOR_BYTES})`);
  }
  let end = bytes.length;
  // ^Z (DOS EOF) and NUL padding at the end of the file are ignored.
  while (end > 0 && (bytes[end - 1] === 0x1a || bytes[end - 1] === 0)) end--;
  let text: string;
  if (bytes[0] === 0xff && bytes[1] === 0xfe) text = new TextDecoder("utf-16le").decode(bytes.subarray(2, bytes.length));
  else if (bytes[0] === 0xfe && bytes[1] === 0xff) text = new TextDecoder("utf-16be").decode(bytes.subarray(2, bytes.length));
  else {
    const start = bytes[0] === 0xef && bytes[1] === 0xbb && bytes[2] === 0xbf ? 3 : 0;
    const body = bytes.subarray(start, end);
    try {
      text = new TextDecoder("utf-8", { fatal: true }).decode(body);
    } catch {
      text = new TextDecoder("windows-1252").decode(body);
    }
  }
  return text.replace(/[\u001a\u0000]+$/, "");
}

/**
 * Splits text into lines on CRLF, CR or LF. Rejects control characters (binary data) and overlong
 * lines with an error naming the line.
 */
export function descriptorLines(text: string, label: string): string[] {
  const lines = text.split(/\r\n|\r|\n/);
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!;
    if (line.length > MAX_LINE) {
      throw new Error(`${label}:${i + 1}: line is ${line.length} characters long (limit ${MAX_LINE}); not a disc descriptor?`);
    }
    // eslint-disable-next-line no-control-regex
    const bad = /[\u0000-\u0008\u000b-\u001f\u007f]/.exec(line);
    if (bad) {
      throw new Error(`${label}:${i + 1}: binary data (byte 0x${bad[0].charCodeAt(0).toString(16).padStart(2, "0")}) in a text descriptor`);
    }
  }
  return lines;
}
