// Counters of the reply and receive paths, per connection (SocketTransport.stats) and summed by
// NbdServer.transportStats() for tests: which ways bytes went.

export interface TransportStats {
  /** sendfile(2) calls; copySend calls (read, then send: one reader, see bulkReaders); those of either that sent less than asked or nothing (socket full). */
  sendfileCalls: number;
  copySends: number;
  sendfileShort: number;
  /** Times the socket was full and the writer waited for `drain`. */
  drainWaits: number;
  /** File bytes that were read into memory: under TLS, or sent by copySend. */
  copiedFileBytes: number;
  /** WRITE payload bytes received straight into their buffer (recvInto) rather than through Bun. */
  receivedInPlace: number;
}

export function newTransportStats(): TransportStats {
  return { sendfileCalls: 0, copySends: 0, sendfileShort: 0, drainWaits: 0, copiedFileBytes: 0, receivedInPlace: 0 };
}

/** Add `from`'s counts to `to`. */
export function addStats(to: TransportStats, from: TransportStats): void {
  for (const k of Object.keys(from) as (keyof TransportStats)[]) to[k] += from[k];
}
