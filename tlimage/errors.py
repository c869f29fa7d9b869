"""The error tree. Every error a user can cause derives from `TlimageError`; this drawing is
all of them (tests/style/test_error_tree.py checks it against the code). A class defined outside
this module names its module in parentheses.

    TlimageError                 exit code 1 unless a subclass says otherwise
    ├── SourceError              bad input at a place in a file: file:line:col, the line, a caret
    │   ├── IRSyntaxError        the IR text form does not parse
    │   ├── DockerfileError      a Dockerfile is wrong
    │   │   ├── DockerfileParseError        (frontends.dockerfile.parser) lines, directives
    │   │   ├── DockerfileInstructionError  (frontends.dockerfile.instructions) flags, args
    │   │   └── ShellError                  (frontends.dockerfile.shell) word expansion
    │   └── IgnorePatternError   (cache.ignore) a bad pattern in a .dockerignore file
    ├── DSLError                 a Python DSL call was wrong; names the call site file:line
    ├── JSONFormError            a JSON image document is invalid; names the JSON path
    │   └── JSONDocumentError    (frontends.jsonform.jsonparse) ... and the place in the file
    ├── DiscoveryError           no image / several images / unknown image name in a file
    ├── BadPattern               (cache.ignore) a bad ignore pattern given directly
    ├── UnsafePathError          (_fs) an archive or tree would write outside its destination
    ├── CacheError               the layer cache: lock time-outs, corrupt entries
    │   ├── LockTimeout          (cache.lock) a cache lock was not granted in time
    │   ├── ContextPathError     (cache.filehash) a context path cannot be hashed
    │   ├── LayerError           (cache.layer) a layer cannot be made or applied
    │   │   └── BadCompression   (cache.layer) a stored layer's bytes do not decompress
    │   ├── CorruptBlob          (cache.store) a stored blob does not match its digest
    │   └── BlobNotFound         (cache.store) a blob is not in the store
    ├── NetworkError             a sandbox's private network: bad policy, missing helper, rules
    ├── SandboxError             (sandbox.namespace) a namespace sandbox could not start or be
    │                            entered
    ├── ExecutorError            a build step could not run
    │   ├── StepFailed           a step ran and exited non-zero; carries its source location
    │   ├── StepTimeout          (executor.base) a step ran past its time-out and was killed
    │   ├── ProvisionError       (sandbox.qemu.provision) no guest kernel/initramfs could be made
    │   ├── BaseError            (executor.bases) a base root filesystem could not be built
    │   ├── BootError            (sandbox.qemu.process) the microVM did not come up
    │   └── ProtocolError        (sandbox.qemu.protocol) the guest agent spoke something else
    ├── BuildError               the builder could not prepare a step or keep its result
    │   ├── ContextError         (builder.context) a COPY/ADD source is missing or outside
    │   ├── FetchError           (builder.fetch) an ADD URL could not be fetched
    │   ├── MountError           (builder.mounts.spec) a RUN mount cannot be set up
    │   └── NameTaken            (builder.loop) the name belongs to an image of another source
    ├── DiskFullError            a build ran out of disk space (names the step and the folder)
    ├── RegistryError            image names: unknown, invalid, conflicts
    ├── OCIError                 (oci) a remote registry, image reference or OCI layout; names
    │   │                        the image reference
    │   └── BlobInterrupted      (oci.client) a blob transfer broke off; it can be retried
    └── RuntimeError_            sandboxes: unknown id, wrong state
        ├── SandboxNotFound      (runtime) no sandbox of that id or name
        ├── ExecStartError       (runtime) the command never ran (exit code 127)
        └── ExecTimeout          (runtime) the command outlived its time-out (exit code 124)

The CLI prints `str(error)` (plus `error.hint` when present) and exits with `error.exit_code`;
it never prints a Python traceback for a `TlimageError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tlimage.source import Span


class TlimageError(Exception):
    """Root of every user-facing error."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def location_fields(self) -> dict[str, Any]:
        """Where the error is, as the structured fields of a JSON `error` event: `file`,
        `line`, `column` (1-based) and `json_path`, each None when not known."""
        span = getattr(self, "span", None)
        if span is not None:
            return {"file": span.file, "line": span.line, "column": span.col, "json_path": None}
        return {"file": None, "line": None, "column": None, "json_path": None}

    def render(self) -> str:
        """The full text shown to a person: the message, then the hint if any."""
        text = str(self)
        if self.hint:
            text += f"\nhint: {self.hint}"
        return text


class SourceError(TlimageError):
    """An error at a place in a source file. `str()` is `file:line:col: message` plus the
    offending line with a caret under the column, when the text is known."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        span: Span | None,
        *,
        text: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.span = span
        self.text = text  # the whole source, when it is not a file on disk

    def __str__(self) -> str:
        if self.span is None:
            return self.message
        return self.span.render(self.message, self.text)


class IRSyntaxError(SourceError):
    pass


class DockerfileError(SourceError):
    pass


class DSLError(TlimageError):
    """A wrong call in the Python DSL. `where` is the user's call site as `file:line`."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        where: str | None = None,
        *,
        hint: str | None = None,
        span: Span | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.where = where
        self.span = span  # the call site, when known (`where` is its `file:line`)

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class JSONFormError(TlimageError):
    """An invalid JSON image document; `path` is like `images[0].operations[3].args`."""

    exit_code = 2

    def __init__(
        self, message: str, path: str = "", *, file: str | None = None, hint: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.path = path
        self.file = file

    def location_fields(self) -> dict[str, Any]:
        loc = super().location_fields()
        if loc["file"] is None:
            loc["file"] = self.file
        loc["json_path"] = self.path or None
        return loc

    def __str__(self) -> str:
        where = ":".join(p for p in (self.file, self.path) if p)
        return f"{where}: {self.message}" if where else self.message


class DiscoveryError(TlimageError):
    exit_code = 2


class CacheError(TlimageError):
    pass


class ExecutorError(TlimageError):
    pass


class StepFailed(ExecutorError):
    """A build step exited non-zero. `location` is the step's source (file:line), `log_tail` the
    last lines it printed."""

    def __init__(
        self,
        message: str,
        *,
        location: str | None = None,
        exit_code: int | None = None,
        log_tail: tuple[str, ...] = (),
        hint: str | None = None,
        span: Span | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.span = span  # the step's source location, when known
        self.location = location
        self.step_exit_code = exit_code
        self.log_tail = log_tail

    def __str__(self) -> str:
        head = f"{self.location}: {self.message}" if self.location else self.message
        if self.log_tail:
            head += "\n" + "\n".join("  | " + line for line in self.log_tail)
        return head


class BuildError(TlimageError):
    """The builder could not prepare a step (its sources, its mounts)."""


class NetworkError(TlimageError):
    """A sandbox's private network (sandbox.network): a bad policy entry, a missing helper or
    rules the kernel refused."""


class RegistryError(TlimageError):
    pass


class DiskFullError(TlimageError):
    """A build ran out of disk space; names the step and the folder that is full."""


class OCIError(TlimageError):
    """Talking to a container registry or reading an OCI layout failed. `ref` is the image
    reference that asked for it, when known; `span` the place in a Dockerfile, DSL call or JSON
    document that named it (`str()` is then `file:line:col: message`, the line and a caret)."""

    def __init__(self, message: str, *, ref: str | None = None, hint: str | None = None,
                 span: Span | None = None) -> None:  # fmt: skip
        super().__init__(message, hint=hint)
        self.ref = ref
        self.span = span

    def __str__(self) -> str:
        return self.message if self.span is None else self.span.render(self.message)


class RuntimeError_(TlimageError):  # noqa: N801 - `RuntimeError` is a builtin
    pass


__all__ = [
    "BuildError",
    "CacheError",
    "DSLError",
    "DiscoveryError",
    "DiskFullError",
    "DockerfileError",
    "ExecutorError",
    "IRSyntaxError",
    "JSONFormError",
    "NetworkError",
    "OCIError",
    "RegistryError",
    "RuntimeError_",
    "SourceError",
    "StepFailed",
    "TlimageError",
]
