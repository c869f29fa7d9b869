// Module loader hooks for the exporter (registered with `module.register`, Node >= 20.6).
//
// resolve: `@tlimage/sdk` resolves to the user's installed copy when there is one, else to the
//   copy this file belongs to, so an image file runs without an `npm install`. From a .ts
//   module, relative imports written the TypeScript way (`./base.js` for base.ts, or `./base`)
//   find the .ts file.
// load: .ts/.mts files are compiled to JavaScript with the `typescript` package's
//   transpileModule (types removed, nothing checked; an inline source map keeps stack traces,
//   and so the recorded call sites, on the TypeScript lines). The package is looked up next to
//   the image file first, then next to this SDK. Without it, a Node that strips types itself
//   (>= 22.6 with the feature on) loads the file; otherwise the error says what to install.

import { existsSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { fileURLToPath, pathToFileURL } from "node:url";

const SDK_NAME = "@tlimage/sdk";
const SDK_ENTRIES = {
  [SDK_NAME]: new URL("./index.js", import.meta.url).href,
  [`${SDK_NAME}/export`]: new URL("./export.js", import.meta.url).href,
};
const TS_FILE = /\.(ts|mts)$/;

export async function resolve(specifier, context, nextResolve) {
  try {
    return await nextResolve(specifier, context);
  } catch (err) {
    if (specifier in SDK_ENTRIES) return { url: SDK_ENTRIES[specifier], shortCircuit: true };
    const parent = context.parentURL ?? "";
    if (TS_FILE.test(parent) && /^\.\.?\//.test(specifier)) {
      const candidates = [
        specifier.replace(/\.js$/, ".ts").replace(/\.mjs$/, ".mts"),
        `${specifier}.ts`,
        `${specifier}/index.ts`,
      ];
      for (const c of candidates) {
        const url = new URL(c, parent);
        if (existsSync(fileURLToPath(url))) return { url: url.href, shortCircuit: true };
      }
    }
    throw err;
  }
}

let typescript; // undefined: not looked up yet; null: not found

async function findTypeScript(fromFile) {
  if (typescript !== undefined) return typescript;
  for (const base of [fromFile, fileURLToPath(import.meta.url)]) {
    try {
      const where = createRequire(base).resolve("typescript");
      const mod = await import(pathToFileURL(where).href);
      typescript = mod.default ?? mod;
      return typescript;
    } catch {
      // not installed there
    }
  }
  typescript = null;
  return null;
}

export async function load(url, context, nextLoad) {
  if (!url.startsWith("file:") || !TS_FILE.test(url)) return nextLoad(url, context);
  const file = fileURLToPath(url);
  const ts = await findTypeScript(file);
  if (!ts) {
    if (process.features?.typescript) return nextLoad(url, context);
    const err = new Error(
      `cannot run ${file}: this Node (${process.version}) does not run TypeScript by itself, ` +
      "and the typescript package was not found next to the file nor next to the tlimage " +
      "TypeScript SDK. Install it (npm install --save-dev typescript@5), use Node >= 22.18, " +
      "or write the image file as .mjs");
    err.code = "TLIMAGE_NO_TYPESCRIPT";
    throw err;
  }
  const source = await readFile(file, "utf8");
  const out = ts.transpileModule(source, {
    fileName: file,
    reportDiagnostics: true,
    compilerOptions: {
      module: ts.ModuleKind.ESNext,
      target: ts.ScriptTarget.ES2022,
      inlineSourceMap: true,
      inlineSources: true,
      isolatedModules: true,
    },
  });
  const diag = (out.diagnostics ?? []).find(
    (d) => d.category === ts.DiagnosticCategory.Error);
  if (diag) {
    const { line, character } = diag.file.getLineAndCharacterOfPosition(diag.start ?? 0);
    const message = ts.flattenDiagnosticMessageText(diag.messageText, "\n");
    const err = new SyntaxError(
      `${file}:${line + 1}:${character + 1}: invalid TypeScript: ${message}`);
    err.code = "TLIMAGE_TS_SYNTAX";
    throw err;
  }
  return { format: "module", source: out.outputText, shortCircuit: true };
}
