"""Runtime errors beyond the generic `RuntimeError_` (unknown id, wrong state)."""

from __future__ import annotations

from tlimage.errors import RuntimeError_


class SandboxNotFound(RuntimeError_):
    pass


class ExecStartError(RuntimeError_):
    """The command never ran: unknown user, missing workdir, program not found."""

    exit_code = 127


class ExecTimeout(RuntimeError_):
    """The command outlived its timeout and was killed."""

    exit_code = 124
