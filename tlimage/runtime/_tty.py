"""Relays a sandbox's pseudo-terminal to this process's terminal (`tl sbx exec -it`,
`tl sbx shell`): the local terminal in raw mode (restored after), the window size copied at
start and on every SIGWINCH, keys (Ctrl-C included) passed as bytes, so the sandbox's line
discipline turns them into signals for its foreground process."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import struct
import threading
from collections.abc import Callable


def window_size(fd: int) -> tuple[int, int]:
    """(rows, columns) of the terminal on `fd`, 24x80 when it is not one."""
    try:
        sz = os.get_terminal_size(fd)
        return sz.lines or 24, sz.columns or 80
    except OSError:
        return 24, 80


def _copy_size(src: int, master: int) -> None:
    import fcntl
    import termios

    rows, cols = window_size(src)
    with contextlib.suppress(OSError):
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def relay(master: int, finish: Callable[[], int], in_fd: int = 0, out_fd: int = 1) -> int:
    """Pumps bytes both ways until the program's terminal closes; returns its exit code."""
    import termios
    import tty

    saved = None
    if os.isatty(in_fd):
        saved = termios.tcgetattr(in_fd)
        tty.setraw(in_fd, termios.TCSANOW)
    old_winch = None
    if threading.current_thread() is threading.main_thread():
        size_src = in_fd if os.isatty(in_fd) else out_fd
        old_winch = signal.signal(signal.SIGWINCH, lambda *_: _copy_size(size_src, master))
    stdin_open = True
    try:
        while True:
            fds = [master] + ([in_fd] if stdin_open else [])
            try:
                ready, _, _ = select.select(fds, [], [])
            except InterruptedError:
                continue
            if master in ready:
                try:
                    data = os.read(master, 65536)
                except OSError as e:
                    if e.errno != errno.EIO:
                        raise
                    data = b""  # every holder of the terminal's other side is gone
                if not data:
                    break
                _write_all(out_fd, data)
            if stdin_open and in_fd in ready:
                data = os.read(in_fd, 65536)
                if data:
                    _write_all(master, data)
                else:
                    stdin_open = False
                    with contextlib.suppress(OSError):
                        _write_all(master, b"\x04")  # end of input, as a terminal says it
    finally:
        if saved is not None:
            termios.tcsetattr(in_fd, termios.TCSADRAIN, saved)
        if old_winch is not None:
            signal.signal(signal.SIGWINCH, old_winch)
        os.close(master)
    return finish()
