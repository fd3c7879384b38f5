// Who is on the other end of a connection, as export resolution and logs see it: transport, peer
// address, and once STARTTLS has finished (issue 13) the TLS identity, a certificate's CN or a PSK
// username. The same shape as the TLS work's (its types.ts), so the two meet without adapters.

/** Who the peer proved to be during the TLS handshake. */
export interface TlsIdentity {
  /** "x509": a certificate (or none, without --tls-verify-peer); "psk": a pre-shared key. */
  readonly kind: "x509" | "psk";
  /** The client certificate's subject CN or the PSK username; null when the client sent no certificate. */
  readonly name: string | null;
  readonly protocol: string;
  readonly cipher: string;
}

export interface ClientIdentity {
  readonly transport: "tcp" | "unix";
  /** The peer's IP address; null on unix sockets. */
  readonly address: string | null;
  readonly port: number | null;
  /** Set once STARTTLS succeeded; null on a plain connection. */
  readonly tls: TlsIdentity | null;
}

/** A plain TCP peer (`address` as the socket reports it). */
export function tcpClient(address: string, port: number | null = null): ClientIdentity {
  return { transport: "tcp", address, port, tls: null };
}
export const UNIX_PEER: ClientIdentity = Object.freeze({ transport: "unix" as const, address: null, port: null, tls: null });

/** "10.0.0.5", "unix", or with TLS "10.0.0.5 (psk vm1)", for log lines. */
export function describeClient(c: ClientIdentity): string {
  const where = c.address ?? "unix";
  return c.tls ? `${where} (${c.tls.kind} ${c.tls.name ?? "no certificate"})` : where;
}

/** Log fields for a client: peer address and TLS identity. */
export function clientFields(c: ClientIdentity): { peer: string; tls?: string } {
  return c.tls ? { peer: c.address ?? "unix", tls: `${c.tls.kind} ${c.tls.name ?? "-"}` } : { peer: c.address ?? "unix" };
}
