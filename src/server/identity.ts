// Who is on the other end of a connection, as export resolution and logs see it: the peer address
// (or "unix"), and once STARTTLS has finished (issue 13) the TLS identity, a certificate's CN or a
// PSK username. One small shape shared by the listener, the TLS transport and resolution.

/** What TLS proved about the peer. */
export interface TlsIdentity {
  readonly kind: "x509" | "psk";
  /** The client certificate's subject CN, or the PSK username. */
  readonly name: string;
}

export interface ClientIdentity {
  /** The peer's IP address as the socket reports it, or "unix" for a unix socket. */
  readonly address: string;
  /** Set by the TLS transport after a successful handshake; absent on plain connections. */
  readonly tls?: TlsIdentity;
}

export const UNIX_PEER: ClientIdentity = Object.freeze({ address: "unix" });

/** "10.0.0.5", "unix", or with TLS "10.0.0.5 (psk vm1)", for log lines. */
export function describeClient(c: ClientIdentity): string {
  return c.tls ? `${c.address} (${c.tls.kind} ${c.tls.name})` : c.address;
}
