// A device stack rebuilt from its recipe (BlockDevice.recipe) in another thread: a connection
// served on a thread of its own (server/connection-thread.ts) gets the same layers over the same
// open file as the stack the event loop opened. Only layers that keep no state in memory have
// recipes: the raw file (RawFile.shared: the owner's descriptor, every call synchronous), the
// partition view and the ISO view.
import { RawFile } from "./file.ts";
import { IsoView } from "./iso.ts";
import { PartitionView } from "./partition-view.ts";
import type { BlockDevice, DeviceRecipe } from "./types.ts";

export function fromRecipe(r: DeviceRecipe, log: (msg: string) => void): BlockDevice {
  switch (r.kind) {
    case "file": return RawFile.shared(r, log);
    case "partition": return new PartitionView(fromRecipe(r.inner, log), r.start, r.length);
    case "iso": return new IsoView(fromRecipe(r.inner, log));
  }
}
