"""Rendering build events for people: one line per step with CACHED or its duration, build
output streamed beneath the step that prints it. Colour on a terminal, plain text in CI."""

from __future__ import annotations

import sys
from typing import Any

from tlimage.cli.render import is_tty
from tlimage.cli.render import size as _size


class StepPrinter:
    def __init__(self, stream: Any = None, *, color: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.color = is_tty(self.stream) if color is None else color
        self._console = None
        if self.color:
            from rich.console import Console

            self._console = Console(file=self.stream, highlight=False, soft_wrap=True)
        self._open_line: dict[tuple[str, str], str] = {}

    def _print(self, text: str, style: str | None = None) -> None:
        if self._console is not None:
            from rich.markup import escape

            self._console.print(f"[{style}]{escape(text)}[/]" if style else escape(text))
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def __call__(self, ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        if kind == "status":
            self._print(f"» {ev['message']}", "cyan")
        elif kind == "step_started":
            at = f"  ({ev['at']})" if ev.get("at") else ""
            self._print(f"[{ev['stage']} {ev['index'] + 1}/{ev['total']}] {ev['step']}{at}", "bold")
        elif kind == "step_cached":
            self._print("  CACHED", "green")
        elif kind == "explain":
            self._print(f"  miss: {ev['reason']}", "yellow")
        elif kind == "build_log":
            self._log(ev)
        elif kind == "step_done":
            self._flush_logs()
            if not ev.get("config_only"):
                size = f", {_size(ev['size'])} layer" if ev.get("layer") else ", no changes"
                self._print(f"  done in {ev['duration']:.2f}s{size}", "green")
        elif kind == "snapshot_created":
            self._print(f"snapshot {ev['image_id']}: {ev['layers']} layers, {_size(ev['size'])}")
        elif kind == "image_registered":
            self._print(f"registered {ev['name']}:{ev['tag']} in project {ev['project']}",
                        "bold green")  # fmt: skip
        elif kind == "pull_layer":
            self._pull_layer(ev)
        elif kind == "done":
            self._print(f"built in {ev['duration']:.2f}s ({ev['cached_steps']} cached, "
                        f"{ev['executed_steps']} run)")  # fmt: skip

    def _pull_layer(self, ev: dict[str, Any]) -> None:
        """One line per layer of a pulled base once it is stored: size and rate."""
        import time

        starts = self.__dict__.setdefault("_pull_starts", {})
        now = time.monotonic()
        starts.setdefault(ev["layer"], now)
        if ev["status"] == "done":
            took = max(now - starts.pop(ev["layer"]), 1e-3)
            self._print(f"  ↓ {ev['layer'][:19]}… {_size(ev['total'])} "
                        f"({_size(ev['total'] / took)}/s)", "cyan")  # fmt: skip
        elif ev["status"] == "exists":
            self._print(f"  ✓ {ev['layer'][:19]}… already stored", "dim")

    def _log(self, ev: dict[str, Any]) -> None:
        key = (str(ev.get("index")), ev.get("stream", "stdout"))
        text = self._open_line.get(key, "") + ev["data"]
        *lines, rest = text.split("\n")
        self._open_line[key] = rest
        for line in lines:
            self._print(f"  │ {line}", "dim")

    def _flush_logs(self) -> None:
        for rest in self._open_line.values():
            if rest:
                self._print(f"  │ {rest}", "dim")
        self._open_line.clear()
