// Exporting the images of a module as a JSON image document.
//
// A module's images are its default export (an Image or an array of Images) followed by its
// named exports that are Images (or arrays of them), in the module namespace's order
// (alphabetical). The same Image exported under two names counts once.

import { isImage, toDocument } from "./index.js";

/** The images a module exports. */
export function imagesOf(namespace) {
  const out = [];
  const add = (value) => {
    const values = Array.isArray(value) ? value : [value];
    for (const v of values) if (isImage(v) && !out.includes(v)) out.push(v);
  };
  if ("default" in namespace) add(namespace.default);
  for (const key of Object.keys(namespace)) if (key !== "default") add(namespace[key]);
  return out;
}

/** The JSON image document of a module's images; `sources` records each call site. */
export function exportModule(namespace, how = {}) {
  return toDocument(imagesOf(namespace), how);
}
