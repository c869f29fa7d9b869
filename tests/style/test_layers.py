"""The import layers: an import never points up the pipeline, a private name never crosses a
package, and packages import each other without cycles.

Every `import` in every module of `tlimage` is read with `ast`, including those inside functions
(lazy imports are still dependencies). The layers, bottom first:

    errors, source, notices, _fs, _paths, _private, _layout, _grammar, _sqlite   shared
    ir                       the build-step IR
    frontends  -> ir         Python DSL, JSON, TypeScript, Dockerfile
    cache      -> ir         blobs, layers, keys
    sandbox    -> cache      namespace and QEMU isolation
    oci        -> cache, ir  registry protocol client, OCI layouts
    registry   -> cache, ir  image names (SQLite)
    executor   -> sandbox, cache, ir                 runs one build step
    builder    -> frontends, ir, cache, executor, oci, sandbox, registry
    runtime    -> sandbox, registry, cache           keeps sandboxes alive
    cli, tlimage/__init__, __main__  -> anything

A private name is a module or attribute whose name starts with `_`; importing one from another
package (`from tlimage.executor.microvm import _Channel`) is an error. The shared root modules
(`tlimage/_fs.py` ...) are private to tlimage, not to a package, so every package may use them.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import tlimage

PACKAGE = Path(tlimage.__file__).parent
SHARED = {"errors", "source", "notices", "_fs", "_paths", "_private", "_layout", "_grammar",
          "_sqlite"}  # fmt: skip
TOP = {"cli", "", "__main__"}
ALLOWED: dict[str, set[str]] = {
    "ir": set(),
    "frontends": {"ir"},
    "cache": {"ir"},
    "sandbox": {"cache"},
    "oci": {"cache", "ir"},
    "registry": {"cache", "ir"},
    "executor": {"sandbox", "cache", "ir"},
    "builder": {"frontends", "ir", "cache", "executor", "oci", "sandbox", "registry"},
    "runtime": {"sandbox", "registry", "cache"},
}

# Known violations being removed right now, as (importing module, imported module). Each line
# says who removes it; prune this list as the work lands (the test fails on a stale entry).
KNOWN: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@functools.cache
def imports() -> list[tuple[str, str, str | None, int]]:
    """(importing module, imported module, imported name or None, line) for every import of a
    tlimage module; `from tlimage.x import y` where y is a module counts as importing it."""
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        mod = _module_name(path)
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                out += [(mod, a.name, None, node.lineno) for a in node.names
                        if a.name.split(".")[0] == "tlimage"]  # fmt: skip
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    target = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    target = node.module or ""
                if target.split(".")[0] != "tlimage":
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    if sub in modules:
                        out.append((mod, sub, None, node.lineno))
                    else:
                        out.append((mod, target, a.name, node.lineno))
    return out


def package_of(module: str) -> str:
    """`tlimage.cache.store` -> `cache`; `tlimage.errors` -> `errors`; `tlimage` -> ``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def violations() -> dict[tuple[str, str], list[str]]:
    found: dict[tuple[str, str], list[str]] = {}
    for mod, target, name, line in imports():
        src, dst = package_of(mod), package_of(target)
        where = f"{mod}:{line}: imports {target}" + (f".{name}" if name else "")
        problems = []
        if src != dst:
            if src in TOP:
                pass
            elif dst in SHARED or (dst == "" and name is None):  # `import tlimage` is lazy
                pass
            elif src in SHARED:
                problems.append("a shared root module imports a package")
            elif dst not in ALLOWED.get(src, set()):
                problems.append(f"{src} may not import {dst}")
            private = [p for p in target.split(".")[2:] if p.startswith("_") and p != "__init__"]
            if dst not in SHARED and (private or (name and name.startswith("_"))):
                problems.append("a private name crosses packages")
        for p in problems:
            found.setdefault((mod, target), []).append(f"{where} ({p})")
    return found


def test_imports_follow_the_layers() -> None:
    found = violations()
    new = sorted(m for key, msgs in found.items() if key not in KNOWN for m in msgs)
    assert not new, "imports against the layers:\n" + "\n".join(new)
    stale = sorted(f"{a} -> {b}" for a, b in KNOWN if (a, b) not in found)
    assert not stale, "KNOWN entries no longer needed, remove them:\n" + "\n".join(stale)


def test_packages_have_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {}
    for mod, target, _name, _line in imports():
        src, dst = package_of(mod), package_of(target)
        if src != dst and src not in TOP and (mod, target) not in KNOWN:
            graph.setdefault(src, set()).add(dst)

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return [*path, start]
                if nxt not in path:
                    stack.append((nxt, [*path, nxt]))
        return None

    cycles = [c for c in map(cycle_from, sorted(graph)) if c]
    assert not cycles, "package import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_reader_sees_lazy_and_relative_imports() -> None:
    # The walk must see function-level imports, or the test could pass on an empty list.
    found = {(m, t) for m, t, _n, _l in imports()}
    assert ("tlimage.cli.app", "tlimage.builder.gc") in found  # inside a command function
    assert ("tlimage.frontends.dsl", "tlimage.frontends.mounts") in found
    assert package_of("tlimage.executor.base") == "executor" and package_of("tlimage") == ""
