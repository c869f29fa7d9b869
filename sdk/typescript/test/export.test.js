import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

import { Image } from "../src/index.js";
import { imagesOf } from "../src/export.js";

const EXPORTER = fileURLToPath(new URL("../bin/tlimage-export.js", import.meta.url));
const MODULES = fileURLToPath(new URL("./modules/", import.meta.url));

function exportFile(name, ...flags) {
  const r = spawnSync(process.execPath, ["--enable-source-maps", EXPORTER, ...flags,
    join(MODULES, name)], { encoding: "utf8" });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

function hasTypeScript() {
  try {
    createRequire(import.meta.url).resolve("typescript");
    return true;
  } catch {
    return Boolean(process.features?.typescript);
  }
}
const NO_TS = hasTypeScript() ? false
  : "the typescript package is not installed (npm ci in sdk/typescript)";

test("imagesOf: default first, then named exports; each image once", () => {
  const a = new Image({ name: "a" });
  const b = new Image({ name: "b" });
  assert.deepEqual(imagesOf({ default: b, x: a, y: [a, b], z: 3 }), [b, a]);
  assert.deepEqual(imagesOf({ other: "x" }), []);
});

test("exports a module's images as one document on stdout", () => {
  const r = exportFile("several.mjs");
  assert.equal(r.status, 0, r.stderr);
  const doc = JSON.parse(r.stdout);
  assert.equal(doc.schema_version, 1);
  assert.deepEqual(doc.images.map((i) => i.name), ["main", "base", "x"]);
  assert.deepEqual(doc.images[1].operations.map((o) => o.args[0]),
    ["echo base", "echo worker"]);
  assert.match(r.stderr, /a log line that must not reach the JSON/);
});

test("--sources records call sites; --out writes a file", () => {
  const out = join(mkdtempSync(join(tmpdir(), "tlimage-export-")), "doc.json");
  const r = exportFile("several.mjs", "--sources", "--out", out);
  assert.equal(r.status, 0, r.stderr);
  assert.equal(r.stdout, "");
  const doc = JSON.parse(readFileSync(out, "utf8"));
  const worker = doc.images[1];
  assert.deepEqual(worker.source, { file: join(MODULES, "several.mjs"), line: 3, column: 14 });
  assert.deepEqual(worker.operations.map((o) => o.source.line), [3, 4]);
});

test("a module that throws: the message points at the line", () => {
  const r = exportFile("throws.mjs");
  assert.equal(r.status, 2);
  assert.equal(r.stdout, "");
  assert.match(r.stderr, new RegExp(`^${join(MODULES, "throws.mjs")}:5:\\d+: loading the file ` +
    "raised TypeError: Cannot read properties of undefined"));
});

test("a wrong SDK call names the call and its place", () => {
  const r = exportFile("wrong-call.mjs");
  assert.equal(r.status, 2);
  assert.match(r.stderr, new RegExp(`^${join(MODULES, "wrong-call.mjs")}:4:4: ` +
    'run\\(\\): unknown option "nework"; allowed: env, force, mounts, network, user, workdir\n$'));
});

test("a JavaScript syntax error is located", () => {
  const r = exportFile("bad-syntax.mjs");
  assert.equal(r.status, 2);
  assert.match(r.stderr, new RegExp(`^${join(MODULES, "bad-syntax.mjs")}:2:\\d+: invalid ` +
    "JavaScript: Unexpected token"));
});

test("a module without images is an error", () => {
  const r = exportFile("nothing.mjs");
  assert.equal(r.status, 2);
  assert.match(r.stderr, /nothing\.mjs: exports no image; export one/);
});

test("usage errors", () => {
  const r = spawnSync(process.execPath, [EXPORTER, "--bogus", "x.mjs"], { encoding: "utf8" });
  assert.equal(r.status, 2);
  assert.match(r.stderr, /^usage: tlimage-export/);
});

test("TypeScript: types removed, .js imports find .ts files, lines kept", { skip: NO_TS }, () => {
  const r = exportFile("typed.ts", "--sources");
  assert.equal(r.status, 0, r.stderr);
  const [img] = JSON.parse(r.stdout).images;
  assert.equal(img.name, "api");
  assert.deepEqual(img.operations.map((o) => [o.op, o.source.file.split("/").at(-1),
    o.source.line]), [["RUN", "helper.ts", 7], ["EXPOSE", "helper.ts", 8], ["CMD", "typed.ts", 7]]);
  assert.deepEqual(img.operations[1].args, [8080]);
});

test("TypeScript: a syntax error is located", { skip: NO_TS }, () => {
  const r = exportFile("bad-syntax.ts");
  assert.equal(r.status, 2);
  assert.match(r.stderr, new RegExp(`^${join(MODULES, "bad-syntax.ts")}:2:19: invalid ` +
    "TypeScript: Expression expected"));
});
