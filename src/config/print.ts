// ServiceConfig -> TOML text in the config file's own keys (`serve --print-config`): every setting
// spelled out, defaults included, paths absolute, so the output is itself a valid config file.
import type { ExportConfig, ServerSettings, ServiceConfig } from "./types.ts";
import { describeListen } from "./values.ts";

const q = (s: string) => JSON.stringify(s); // JSON string escapes are valid TOML basic strings
const list = (xs: readonly string[]) => `[${xs.map(q).join(", ")}]`;

export function formatConfig(c: ServiceConfig, note?: string): string {
  const out: string[] = [];
  out.push(`# bun-nbd effective configuration${c.file ? ` (from ${c.file}${note ? `, ${note}` : ""})` : note ? ` (${note})` : ""}`);
  out.push("", "[server]", ...serverLines(c.server));
  for (const e of c.exports) out.push("", "[[export]]", ...exportLines(e));
  return out.join("\n") + "\n";
}

function serverLines(s: ServerSettings): string[] {
  const lines = [
    `listen = ${list(s.listen.map(describeListen))}`,
    `read-only = ${s.readOnly}`,
    `verbose = ${s.verbose}`,
    `quiet = ${s.quiet}`,
    `log-format = ${q(s.logFormat)}`,
  ];
  if (s.metrics) lines.push(`metrics = ${q(describeListen({ kind: "tcp", ...s.metrics }))}`);
  lines.push(`tls = ${q(s.tls)}`);
  if (s.tlsCertificates !== null) lines.push(`tls-certificates = ${q(s.tlsCertificates)}`);
  lines.push(`tls-verify-peer = ${s.tlsVerifyPeer}`);
  if (s.tlsPsk !== null) lines.push(`tls-psk = ${q(s.tlsPsk)}`);
  lines.push(`allow = ${list(s.allow)}`);
  lines.push(`max-connections = ${s.maxConnections}`, `max-connections-per-address = ${s.maxConnectionsPerAddress}`);
  lines.push(`handshake-timeout = ${s.handshakeTimeout}`);
  if (s.workers !== 1) lines.push(`workers = ${s.workers}`);
  lines.push(`threads = ${typeof s.threads === "string" ? q(s.threads) : s.threads}`);
  return lines;
}

function exportLines(e: ExportConfig): string[] {
  const lines = [`name = ${q(e.name)}`, `file = ${q(e.file)}`, `read-only = ${e.readOnly}`];
  const ov = e.overlay;
  if (ov.kind === "snapshot") lines.push(`overlay = "snapshot"`);
  else if (ov.kind === "file") lines.push(`overlay = ${q(ov.path)}`);
  else if (ov.kind === "per-client") lines.push(`overlay = "per-client"`, `overlay-dir = ${q(ov.dir)}`, `client-name = ${q(e.clientName)}`);
  if (ov.kind !== "none") lines.push(`compat = ${e.compat}`);
  if (ov.kind !== "per-client") lines.push(`partitions = ${e.partitions}`);
  if (e.description !== null) lines.push(`description = ${q(e.description)}`);
  if (e.allow.length) lines.push(`allow = ${list(e.allow)}`);
  return lines;
}
