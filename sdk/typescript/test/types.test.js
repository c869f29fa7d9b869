import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { createRequire } from "node:module";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

// The hand-written declarations (src/*.d.ts) accept the documented API and reject misuse:
// test/types/usage.ts must compile, each of its @ts-expect-error lines being an error.
let tsc = null;
try {
  tsc = createRequire(import.meta.url).resolve("typescript/bin/tsc");
} catch {
  // not installed
}

test("declarations type-check the documented usage",
  { skip: tsc ? false : "the typescript package is not installed (npm ci in sdk/typescript)" },
  () => {
    const project = fileURLToPath(new URL("../tsconfig.json", import.meta.url));
    const r = spawnSync(process.execPath, [tsc, "-p", project], { encoding: "utf8" });
    assert.equal(r.status, 0, r.stdout + r.stderr);
  });
