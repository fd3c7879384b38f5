// The small event emitter under the client's own Conn adapters (Bun's sockets, the TLS-PSK engine):
// on/off/emit for the four events the client uses ("error", "end", "close", "data"), in the order
// they were added, without node:events.
export type Listener = (arg?: unknown) => void;

export class ConnEmitter {
  protected readonly listeners: Record<string, Listener[]> = { error: [], end: [], close: [], data: [] };

  emit(event: string, arg?: unknown): void {
    const l = this.listeners[event]!;
    if (l.length === 1) l[0]!(arg);
    else for (const f of [...l]) f(arg);
  }

  on(event: string, f: (...a: never[]) => void): this {
    this.listeners[event]!.push(f as Listener);
    return this;
  }

  off(event: string, f: (...a: never[]) => void): this {
    const l = this.listeners[event]!;
    const i = l.indexOf(f as Listener);
    if (i >= 0) l.splice(i, 1);
    return this;
  }
}
