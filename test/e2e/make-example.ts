// Regenerate examples/boot.img (4 MiB, bootable by SeaBIOS; see examples/README.md):
//   node_modules/.bin/bun test/e2e/make-example.ts [OUT]
import { join } from "node:path";
import { makeHdImage, MiB } from "./images.ts";
import { ROOT } from "../helpers/env.ts";

const out = process.argv[2] ?? join(ROOT, "examples/boot.img");
const img = makeHdImage(out, 4 * MiB);
console.log(`wrote ${out} (${img.size} bytes); the guest prints:\n  ${img.expect.join("\n  ")}`);
