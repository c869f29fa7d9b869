#!/usr/bin/env node
// tlimage-export [--sources] [--compact] [--out PATH] FILE
//
// Loads an image file (.ts, .mts, .mjs, .js) and writes the JSON image document of the images
// it exports to PATH, or to stdout. What the file logs with console.log goes to stderr, so
// stdout carries only the document. The document is indented (one operation per line, so a
// saved file's step spans point at distinct lines) unless --compact. `tl sbx image create image.ts` runs this with --out.
//
// Exit status: 0 with the document on stdout; 2 when the file is at fault (it throws while
// loading, does not parse, exports no image), with one message on stderr that starts with
// `file:line:col: ` when a place is known; 1 for anything else (a bug, a broken install).

import { spawnSync } from "node:child_process";
import { writeFileSync } from "node:fs";
import { register } from "node:module";
import { resolve as resolvePath } from "node:path";
import { pathToFileURL, fileURLToPath } from "node:url";

// A stack frame in a file: `at f (file:///x.mjs:3:7)`, `at /x.js:3:7`.
const FRAME = /(?:\(|at )((?:file:\/\/|\/)[^()]*?):(\d+):(\d+)\)?\s*$/;
const USAGE = "usage: tlimage-export [--sources] [--compact] [--out PATH] FILE";

function fail(message, status = 2) {
  process.stderr.write(`${message}\n`);
  process.exit(status);
}

const args = process.argv.slice(2);
let out = null;
const outAt = args.indexOf("--out");
if (outAt >= 0) {
  out = args[outAt + 1];
  if (!out) fail(USAGE);
  args.splice(outAt, 2);
}
const sources = args.includes("--sources");
const compact = args.includes("--compact");
const files = args.filter((a) => !a.startsWith("--"));
if (files.length !== 1 || args.some((a) => a.startsWith("--") &&
    !["--sources", "--compact"].includes(a))) {
  fail(USAGE);
}
const [major, minor] = process.versions.node.split(".").map(Number);
if (major < 20 || (major === 20 && minor < 6)) {
  fail(`tlimage-export needs Node >= 20.6 (module hooks); this is ${process.version}`, 1);
}

const file = resolvePath(files[0]);
register("../src/hooks.js", import.meta.url);

const { exportModule } = await import("../src/export.js");

let namespace;
const saved = { log: console.log, info: console.info, debug: console.debug };
console.log = console.info = console.debug = console.error;
try {
  namespace = await import(pathToFileURL(file).href);
} catch (err) {
  fail(describe(err, file));
} finally {
  Object.assign(console, saved);
}
const doc = exportModule(namespace, { sources });
if (!doc.images.length) {
  fail(`${file}: exports no image; export one: \`export default new Image({...})\` or ` +
    "`export const app = new Image({...})`");
}
const text = `${JSON.stringify(doc, null, compact ? undefined : 2)}\n`;
if (out === null) process.stdout.write(text);
else writeFileSync(out, text);

/** One line about what went wrong loading the user's file, at the place in it when known. */
function describe(err, file) {
  if (err?.code === "TLIMAGE_NO_TYPESCRIPT" || err?.code === "TLIMAGE_TS_SYNTAX") {
    return err.message.startsWith("cannot run") ? `${file}: ${err.message}` : err.message;
  }
  if (err?.code === "ERR_MODULE_NOT_FOUND") return `${file}: ${err.message}`;
  const name = err?.name ?? "Error";
  const src = err?.source;
  if (name === "ImageDefinitionError" && src?.file) {
    return `${src.file}:${src.line}:${src.column}: ${err.message}`;
  }
  const text = `${name}: ${err?.message ?? String(err)}`;
  const stack = String(err?.stack ?? "");
  // A syntax error names its place on the first line of the stack: `file:///x.mjs:3`.
  if (name === "SyntaxError" && !/^\s+at (?!.*node:internal)/m.test(stack)) {
    return syntaxError(file, err.message) ?? `${file}: invalid JavaScript: ${err.message}`;
  }
  // Otherwise: the innermost frame in a file of the user's (not in node: or in this SDK).
  const sdk = ["../src/", "../bin/"].map((d) => fileURLToPath(new URL(d, import.meta.url)));
  for (const line of stack.split("\n").slice(1)) {
    const m = FRAME.exec(line);
    if (!m) continue;
    const where = toPath(m[1]);
    if (sdk.some((d) => where.startsWith(d)) || where.includes("/node_modules/")) continue;
    return `${where}:${m[2]}:${m[3]}: loading the file raised ${text}`;
  }
  return `${file}: loading the file raised ${text}`;
}

/** A syntax error's place, from `node --check` (a failed import does not carry it). */
function syntaxError(file, message) {
  const check = spawnSync(process.execPath, ["--check", file], { encoding: "utf8" });
  const lines = (check.stderr ?? "").split("\n");
  const head = /^(.+):(\d+)$/.exec(lines[0] ?? "");
  if (check.status === 0 || !head) return null;
  const col = (lines[2] ?? "").indexOf("^") + 1 || 1;
  return `${toPath(head[1])}:${head[2]}:${col}: invalid JavaScript: ${message}`;
}

function toPath(where) {
  return where.startsWith("file://") ? fileURLToPath(where) : where;
}
