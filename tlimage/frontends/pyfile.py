"""Loading a Python image file and finding the images in it.

Images are found two ways: attached to functions with `@function(image=...)`, and bound to
module-level names. Files written for Tensorlake (`from tensorlake.applications import Image,
function`) load unchanged: when the `tensorlake` package is not installed, a small stand-in module
provides `Image` and `function` from this package, and accepts the rest of that module's names
(decorators and classes that do not matter for building an image) as inert placeholders. When
Tensorlake *is* installed its own `Image` objects are read and converted.
"""

from __future__ import annotations

import importlib.util
import sys
import traceback
import types
from pathlib import Path
from typing import Any

from tlimage import ir
from tlimage.errors import DiscoveryError, DSLError, TlimageError
from tlimage.frontends import dsl
from tlimage.source import Span


def load_python_images(path: Path) -> list[ir.ImageDef]:
    """Execute the file and return the images it defines, attached ones first."""
    # The path is kept as the user gave it, so call sites read as they typed it.
    module_name = f"_tlimage_user_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise DiscoveryError(f"{path}: cannot load as a Python file")
    module = importlib.util.module_from_spec(spec)
    dsl._ATTACHED.clear()
    saved_path = list(sys.path)
    sys.path.insert(0, str(path.resolve().parent))
    installed_shim = _install_tensorlake_shim()
    try:
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    except TlimageError:
        raise
    except SyntaxError as e:
        span = Span(e.filename or str(path), e.lineno or 1, e.offset or 1)
        raise DiscoveryError(span.render(f"invalid Python: {e.msg}")) from None
    except BaseException as e:  # the user's code raised while being loaded
        if isinstance(e, KeyboardInterrupt):
            raise
        raise DiscoveryError(_user_exception(e, path)) from None
    finally:
        sys.path[:] = saved_path
        sys.modules.pop(module_name, None)
        if installed_shim:
            for name in _SHIM_MODULES:
                sys.modules.pop(name, None)

    found: list[Any] = [img for _fn, img in dsl._ATTACHED]
    found += [v for k, v in vars(module).items() if not k.startswith("__")
              and _is_image(v)]  # fmt: skip
    dsl._ATTACHED.clear()
    return _unique([_to_ir(img) for img in found])


def _is_image(value: Any) -> bool:
    if isinstance(value, dsl.Image):
        return True
    cls = type(value)
    return cls.__name__ == "Image" and cls.__module__.startswith("tensorlake")


def _to_ir(img: Any) -> ir.ImageDef:
    if isinstance(img, dsl.Image):
        return img.to_ir()
    return _from_tensorlake(img)


def _from_tensorlake(img: Any) -> ir.ImageDef:
    """Convert an Image of the real `tensorlake` package (mutable, operation list)."""
    out = dsl.Image(img._name, img._tag, img._base_image)
    for op in img._build_operations:
        kind = op.type.name
        args, options = list(op.args), dict(op.options or {})
        if kind == "RUN":
            out = out.run(args, options or None)
        elif kind in ("COPY", "ADD"):
            out = getattr(out, kind.lower())(args[0], args[1], options or None)
        elif kind == "ENV":
            out = out.env(args[0], args[1])
        elif kind == "WORKDIR":
            out = out.workdir(args[0])
        elif kind in ("CMD", "ENTRYPOINT"):
            out = getattr(out, kind.lower())(args if len(args) > 1 else args[0])
        else:
            raise DSLError(f"Tensorlake operation {kind} is not supported")
    return out.to_ir()


def _unique(images: list[ir.ImageDef]) -> list[ir.ImageDef]:
    """One image per name. The same object reached twice counts once; an image that another
    of the same name extends step by step (a base bound to its own variable) gives way to it."""
    by_name: dict[str, list[ir.ImageDef]] = {}
    for img in images:
        group = by_name.setdefault(img.name, [])
        if all(img.digest() != other.digest() for other in group):
            group.append(img)
    out = []
    for name, group in by_name.items():
        tips = [a for a in group
                if not any(b is not a and _extends(b, a) for b in group)]  # fmt: skip
        if len(tips) > 1:
            where = ", ".join(_where(t) for t in tips)
            raise DiscoveryError(
                f"several different images are named {name!r} ({where})",
                hint="give each image its own name: Image(name=...)",
            )
        out.append(tips[0])
    return out


def _extends(longer: ir.ImageDef, shorter: ir.ImageDef) -> bool:
    a, b = longer.target_stage.steps, shorter.target_stage.steps
    return len(a) > len(b) and a[: len(b)] == b


def _where(img: ir.ImageDef) -> str:
    span = img.target_stage.meta[0].span
    return span.short if span else "?"


def _user_exception(e: BaseException, path: Path) -> str:
    target = path.resolve()
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if Path(f.filename).resolve() == target]  # fmt: skip
    head = f"{type(e).__name__}: {e}"
    if not frames:
        return f"{path}: loading the file raised {head}"
    f = frames[-1]
    return Span(str(path), f.lineno or 1).render(f"loading the file raised {head}")


# -- the tensorlake stand-in ----------------------------------------------------------------

_SHIM_MODULES = ("tensorlake", "tensorlake.applications")


class _Inert:
    """A placeholder for Tensorlake names that do not affect an image: callable, usable as a
    decorator with or without arguments, subclassable, and returns itself for attributes."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and not kwargs and (callable(args[0]) or isinstance(args[0], type)):
            return args[0]
        return self

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert(f"{self._name}.{name}")

    def __mro_entries__(self, bases: tuple[Any, ...]) -> tuple[type, ...]:
        return (object,)

    def __repr__(self) -> str:
        return f"<tensorlake placeholder {self._name}>"


def _install_tensorlake_shim() -> bool:
    if "tensorlake" in sys.modules:
        return False
    if importlib.util.find_spec("tensorlake") is not None:
        return False
    root = types.ModuleType("tensorlake")
    apps = types.ModuleType("tensorlake.applications")
    apps.Image = dsl.Image  # type: ignore[attr-defined]
    apps.function = dsl.function  # type: ignore[attr-defined]

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert(name)

    apps.__getattr__ = __getattr__  # type: ignore[method-assign]
    root.applications = apps  # type: ignore[attr-defined]
    root.__path__ = []  # a package, so `import tensorlake.applications` works
    sys.modules["tensorlake"] = root
    sys.modules["tensorlake.applications"] = apps
    return True
