// Build `js-clamp.wasm` from `filter.js` with componentize-js (what
// `jco componentize` runs), against the repository's WIT contract.
// Usage: node build.mjs [OUT.wasm]
import { writeFile } from "node:fs/promises";
import { fileURLToPath } from "node:url";
import { dirname, resolve } from "node:path";
import { componentize } from "@bytecodealliance/componentize-js";

const here = dirname(fileURLToPath(import.meta.url));
const out = resolve(process.argv[2] ?? resolve(here, "js-clamp.wasm"));
const { component } = await componentize({
  sourcePath: resolve(here, "filter.js"),
  witPath: resolve(here, "../../wit"),
  worldName: "filter-plugin",
  // A filter is a pure function: no clocks, randomness, stdio or HTTP.
  disableFeatures: ["stdio", "random", "clocks", "http", "fetch-event"],
});
await writeFile(out, component);
console.log(`wrote ${out} (${component.length} bytes)`);
