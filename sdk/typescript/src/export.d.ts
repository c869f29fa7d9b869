import type { DocumentJSON, Image } from "./index.js";

/** The images a module exports: its default export first, then its named exports. */
export declare function imagesOf(namespace: Record<string, unknown>): Image[];
export declare function exportModule(
  namespace: Record<string, unknown>,
  how?: { sources?: boolean },
): DocumentJSON;
