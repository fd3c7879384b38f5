// A device stack rebuilt from its recipe (BlockDevice.recipe) in another thread: a connection
// served on a thread of its own (server/connection-thread.ts) gets the same layers over the same
// open file as the stack the event loop opened. Only layers that keep no state in memory have
// recipes: the raw file (RawFile.shared: the owner's descriptor, every call synchronous), the
// partition view, the ISO view, and a CD's cooked data track (over a one-track disc holding the
// owner's descriptor of its BIN). A remote image gives one only once every block is in its cache,
// whose data file then never changes: a read-only raw file. A rebuilt stack is never closed: the
// descriptors are the owner's.
import { RawFile } from "./file.ts";
import { IsoView } from "./iso.ts";
import { PartitionView } from "./partition-view.ts";
import { CdDisc, type Track } from "./cd/disc.ts";
import { CookedTrackView } from "./cd/views.ts";
import type { BlockDevice, DeviceRecipe } from "./types.ts";

export function fromRecipe(r: DeviceRecipe, log: (msg: string) => void): BlockDevice {
  switch (r.kind) {
    case "file": return RawFile.shared(r, log);
    case "partition": return new PartitionView(fromRecipe(r.inner, log), r.start, r.length);
    case "iso": return new IsoView(fromRecipe(r.inner, log));
    case "cooked": {
      const file = { ...r.file };
      const track = { ...(r.track as Omit<Track, "file">), file };
      return new CookedTrackView(new CdDisc(r.source, "cue", [file], [track], [], track.end, []), track);
    }
  }
}
