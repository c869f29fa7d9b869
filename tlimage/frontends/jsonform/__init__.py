"""The JSON front end: image documents (`image.v1.schema.json`) to IR.

A document is `{"schema_version": 1, "images": [...]}` or one Tensorlake-shaped image object
(`{"type": "image", "name", "tag", "base_image", "operations": [{"op", "args", "options"}]}`).
The TypeScript SDK exports this form; people may also write it by hand.

Three passes, each with its own errors:

1. `parse`: a JSON parser that keeps the offset of every value and key, so errors and step spans
   point into the file (`image.json:12:7`, the line, a caret). Stricter than `json.loads`:
   duplicate keys, NaN/Infinity, comments and trailing commas are errors, each said plainly.
2. `validate`: the published schema *is* the validator's input. `SchemaValidator` implements
   exactly the JSON Schema keywords the schema file uses (and refuses a schema that uses any
   other), so the two cannot drift apart; `tests/unit/test_jsonform_schema.py` checks agreement
   with the `jsonschema` package on fixtures and generated documents. Errors name the JSON path
   (`images[0].operations[3].args`), the value, and what is allowed (the schema's descriptions).
   A few checks the schema cannot state follow (unique image names, mount strings).
3. `lower`: each operation calls the Python DSL method of the same name on a `dsl.Image`, so the
   IR is the DSL's by construction; only the step spans are replaced by places in the JSON file
   (or by the `source` an SDK exporter recorded).

One module a pass: `jsonparse` (with the document error and the spelling of JSON paths),
`schema` (the schema file and `SchemaValidator`) and `lower`; this module re-exports them.
"""

from tlimage.frontends.jsonform.jsonparse import (
    Document,
    JSONDocumentError,
    Path_,
    format_path,
    kind,
    parse,
    show,
)
from tlimage.frontends.jsonform.lower import (
    images_of,
    load_json_images,
    load_json_text,
)
from tlimage.frontends.jsonform.schema import (
    SCHEMA_FILE,
    SCHEMA_VERSION,
    Invalid,
    SchemaValidator,
    schema,
    schema_path,
    schema_text,
    validator,
)

__all__ = [
    "SCHEMA_FILE",
    "SCHEMA_VERSION",
    "Document",
    "Invalid",
    "JSONDocumentError",
    "Path_",
    "SchemaValidator",
    "format_path",
    "images_of",
    "kind",
    "load_json_images",
    "load_json_text",
    "parse",
    "schema",
    "schema_path",
    "schema_text",
    "show",
    "validator",
]
