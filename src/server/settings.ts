// The server's security settings as one plain object (TLS mode and credentials, allow-list, caps,
// handshake deadline), filled alike from CLI flags and config keys of the same names (tls,
// tls-certificates, ..., handshake-timeout); checkSettings() validates it.
import { AllowList, cidrProblem } from "./access.ts";
import type { TlsMode } from "./types.ts";

export interface ServerSettings {
  /** "off" (NOTLS), "on" (STARTTLS offered), "require" (FORCEDTLS). */
  tls: TlsMode;
  /** Directory with ca-cert.pem, server-cert.pem, server-key.pem and optionally ca-crl.pem. */
  tlsCertificates: string | null;
  /** Require client certificates signed by ca-cert.pem. */
  tlsVerifyPeer: boolean;
  /** psktool-format key file (`username:hexkey` lines). */
  tlsPsk: string | null;
  /** CIDR ranges (or single addresses) allowed to connect over TCP; empty: everyone. */
  allow: readonly string[];
  /** Open connections at once; 0: no limit. */
  maxConnections: number;
  /** Open connections at once from one IP address; 0: no limit. */
  maxConnectionsPerAddress: number;
  /** Seconds a client has from connecting to choosing an export (TLS included); 0: no deadline. */
  handshakeTimeout: number;
}

export const DEFAULT_SETTINGS: ServerSettings = {
  tls: "off", tlsCertificates: null, tlsVerifyPeer: false, tlsPsk: null,
  allow: [], maxConnections: 0, maxConnectionsPerAddress: 0, handshakeTimeout: 10,
};

/** Settings after validation, with the allow-list parsed. */
export interface CheckedSettings extends ServerSettings {
  allowList: AllowList;
}

/** A setting that cannot work; `key` is the option/config key it is about. */
export class SettingsError extends Error {
  constructor(readonly key: string, message: string) { super(message); }
}

/** Fills defaults and checks every setting; throws a SettingsError naming the key. */
export function checkSettings(given: Partial<ServerSettings> = {}): CheckedSettings {
  const s: ServerSettings = { ...DEFAULT_SETTINGS };
  for (const [k, v] of Object.entries(given)) if (v !== undefined) (s as unknown as Record<string, unknown>)[k] = v;
  if (!["off", "on", "require"].includes(s.tls)) throw new SettingsError("tls", `tls must be off, on or require, not "${s.tls}"`);
  if (s.tlsCertificates !== null && s.tlsPsk !== null) {
    throw new SettingsError("tls-psk", "tls-certificates and tls-psk cannot be used together: choose certificates or pre-shared keys");
  }
  const creds = s.tlsCertificates !== null || s.tlsPsk !== null;
  if (s.tls !== "off" && !creds) {
    throw new SettingsError("tls", `tls=${s.tls} needs credentials: tls-certificates DIR (X.509) or tls-psk FILE (pre-shared keys)`);
  }
  if (s.tls === "off" && creds) {
    throw new SettingsError("tls", `${s.tlsPsk !== null ? "tls-psk" : "tls-certificates"} is given but TLS is off: add tls=require (or tls=on to keep plain clients too)`);
  }
  if (s.tlsVerifyPeer && s.tlsCertificates === null) {
    throw new SettingsError("tls-verify-peer", "tls-verify-peer checks client certificates: it needs tls-certificates DIR");
  }
  const count = (key: string, v: number) => {
    if (!Number.isInteger(v) || v < 0) throw new SettingsError(key, `${key} must be a whole number >= 0 (0: no limit), not ${v}`);
  };
  count("max-connections", s.maxConnections);
  count("max-connections-per-address", s.maxConnectionsPerAddress);
  if (!Number.isFinite(s.handshakeTimeout) || s.handshakeTimeout < 0) {
    throw new SettingsError("handshake-timeout", `handshake-timeout must be a number of seconds >= 0 (0: none), not ${s.handshakeTimeout}`);
  }
  for (const a of s.allow) {
    const problem = cidrProblem(a);
    if (problem !== null) throw new SettingsError("allow", `allow: ${problem}`);
  }
  return { ...s, allowList: new AllowList(s.allow) };
}
