// The pre-shared key file that GnuTLS's psktool writes and nbdkit, qemu and libnbd read for NBD
// over TLS-PSK: one `username:hexkey` line per user. A pure parser (the callers read the file),
// shared by the server (every user) and the client (one user's key); messages never show a key.

/** Parses the text of a key file; throws naming `file` and the line for anything malformed. */
export function parsePskFile(text: string, file: string): Map<string, Uint8Array> {
  const users = new Map<string, Uint8Array>();
  text.split("\n").forEach((raw, i) => {
    const line = raw.replace(/\r$/, "");
    if (line.trim() === "" || line.startsWith("#")) return;
    const colon = line.lastIndexOf(":");
    const name = colon > 0 ? line.slice(0, colon) : "";
    const hex = colon > 0 ? line.slice(colon + 1).trim() : "";
    if (name === "" || hex === "" || hex.length % 2 !== 0 || !/^[0-9a-fA-F]+$/.test(hex)) {
      throw new Error(`${file}:${i + 1}: expected "username:hexkey" (as psktool writes it)`);
    }
    if (users.has(name)) throw new Error(`${file}:${i + 1}: user "${name}" appears twice`);
    const key = new Uint8Array(hex.length / 2);
    for (let j = 0; j < key.length; j++) key[j] = parseInt(hex.slice(2 * j, 2 * j + 2), 16);
    users.set(name, key);
  });
  if (users.size === 0) throw new Error(`${file}: no keys (expected "username:hexkey" lines, as psktool writes them)`);
  return users;
}
