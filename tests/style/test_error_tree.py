"""The error tree drawn in `tlimage/errors.py`'s docstring is the tree in the code: every class
under `TlimageError` in any `tlimage` module is drawn, under its real parent, and nothing drawn is
missing. Read with `ast` (no module is imported), so a class added anywhere is seen."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import tlimage

PACKAGE = Path(tlimage.__file__).parent
ROOT = "TlimageError"


def code_tree() -> dict[str, tuple[str, str]]:
    """Error class name -> (parent name, module) for every subclass of TlimageError."""
    classes: dict[str, list[tuple[list[str], str]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                bases = [ast.unparse(b).rsplit(".", 1)[-1] for b in node.bases]
                classes.setdefault(node.name, []).append((bases, module))
    tree: dict[str, tuple[str, str]] = {}
    changed = True
    while changed:
        changed = False
        for name, defs in classes.items():
            for bases, module in defs:
                parent = next((b for b in bases if b == ROOT or b in tree), None)
                if parent is not None and name not in tree and name != ROOT:
                    tree[name] = (parent, module)
                    changed = True
    return tree


def drawn_tree() -> dict[str, str]:
    """Class name -> parent name, from the drawing in errors.py's docstring."""
    doc = ast.get_docstring(ast.parse((PACKAGE / "errors.py").read_text(encoding="utf-8")))
    assert doc is not None
    lines = doc.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(ROOT))
    root_col = lines[start].index(ROOT)
    stack: list[tuple[int, str]] = [(root_col, ROOT)]
    out: dict[str, str] = {}
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        m = re.match(r"([ │]*)[├└]── (\w+)", line)
        if m is None:
            continue  # a continuation of the description above
        col = m.start(2)  # a name sits to the right of its parent's name
        while stack and stack[-1][0] >= col:
            stack.pop()
        assert stack, f"drawn outside the tree: {line!r}"
        out[m.group(2)] = stack[-1][1]
        stack.append((col, m.group(2)))
    return out


def test_the_drawing_is_the_code() -> None:
    code = code_tree()
    drawn = drawn_tree()
    missing = sorted(f"{name} ({module}, under {parent})"
                     for name, (parent, module) in code.items() if name not in drawn)  # fmt: skip
    assert not missing, f"error classes not drawn in tlimage/errors.py: {missing}"
    stale = sorted(name for name in drawn if name not in code)
    assert not stale, f"drawn in tlimage/errors.py but not in the code: {stale}"
    moved = sorted(f"{name}: drawn under {drawn[name]}, derives from {parent}"
                   for name, (parent, _m) in code.items() if drawn[name] != parent)  # fmt: skip
    assert not moved, moved


def test_the_tree_reader_sees_a_class() -> None:
    # The walk above must find something to compare, or the test could not fail.
    code = code_tree()
    assert code["MountError"][0] == "BuildError"
    assert code["StepFailed"] == ("ExecutorError", "tlimage.errors")
    assert drawn_tree()["DockerfileInstructionError"] == "DockerfileError"
