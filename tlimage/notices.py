"""Notices said once per machine state: the default base chosen, the KVM fall-back.

`once(key, state, message)` prints `message` (one short line on stderr, or through `say`) the
first time it is called with `state` for `key`, and again only when the state changes; the last
state of each key is kept in `<state dir>/notices.json` (written atomically).
`TLIMAGE_NOTICES=always` says every notice every time.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from tlimage._paths import state_dir


def _path() -> Path:
    return state_dir() / "notices.json"


def _load() -> dict[str, str]:
    try:
        data = json.loads(_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def seen(key: str) -> str | None:
    return _load().get(key)


def once(key: str, state: str, message: str,
         say: Callable[[str], None] | None = None) -> bool:  # fmt: skip
    """Says `message` unless it was said for this `state` already; True when it was said."""
    data = _load()
    if data.get(key) == state and os.environ.get("TLIMAGE_NOTICES") != "always":
        return False
    (say or _default_say)(message)
    data[key] = state
    path = _path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        from tlimage._fs import write_atomic  # lazily: notices are read at CLI start-up

        write_atomic(path, json.dumps(data, sort_keys=True, indent=1) + "\n", durable=False)
    except OSError:
        pass  # a read-only state folder: the notice is said again next time, nothing worse
    return True


def _default_say(message: str) -> None:
    print(f"tlimage: {message}", file=sys.stderr)


def short_reason(reason: str) -> str:
    """The first clause of a probe's reason, without tool output (`tl sbx doctor` has it)."""
    text = reason.replace(" (cached)", "")
    for sep in (";", ": ", "\n"):
        text = text.split(sep)[0]
    return text.strip()[:80]


def kvm_fallback(reason: str, what: str, fallback: str,
                 say: Callable[[str], None] | None = None) -> bool:  # fmt: skip
    """The KVM fall-back notice, once per machine state (what was chosen and why)."""
    short = short_reason(reason)
    return once(
        f"kvm-fallback:{what}",
        f"{fallback}|{short}",
        f"KVM is not usable ({short}); {what} run in {fallback} (details: tl sbx doctor)",
        say,
    )
