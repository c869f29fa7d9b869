"""Dockerfile parsing, stage two: the untyped tree to typed instructions (BuildKit's
`instructions` package).

Each instruction's flags are checked against the flags it accepts (an unknown, repeated or
valueless flag is an error, with a suggestion when one is close), its arguments are counted
and shaped (`FROM base AS name`, `COPY src... dest`, ENV pairs, HEALTHCHECK options), and
`RUN --mount` specs are parsed. Errors name file:line:col and show the line with a caret.

String fields hold the text as written: variables are not expanded and quotes in ENV/LABEL/ARG
values are still there. Expansion needs the build-time environment, so it belongs to lowering,
which calls `command.expand(expander)` (the fields BuildKit expands, per instruction) with
`shell.process_word` bound to the stage's variables. Values that contain `$` are validated
after expansion (`RunCommand.expand` re-parses its mounts); the rest are validated here.

Deliberately as BuildKit: ONBUILD keeps its trigger as text (it runs in a later build);
ARG, STOPSIGNAL and HEALTHCHECK NONE ignore flags (a `Program` warning says so); MAINTAINER is
accepted.

The package, along its jobs: `commands` (the typed instructions, `Stage`, `Program`), `flags`
(BuildKit's BFlags) and `parse` (per instruction, and the whole program). `RUN --mount` specs
are parsed by the mount parser all front ends share, `tlimage.frontends.mounts`.
"""

from tlimage.frontends.dockerfile.instructions.commands import (
    NETWORK_MODES,
    SECURITY_MODES,
    AddCommand,
    ArgCommand,
    ArgDef,
    CmdCommand,
    Command,
    CopyCommand,
    DockerfileInstructionError,
    EntrypointCommand,
    EnvCommand,
    Expander,
    ExposeCommand,
    FromCommand,
    HealthcheckCommand,
    KeyValuePair,
    LabelCommand,
    MaintainerCommand,
    Mount,
    OnbuildCommand,
    Program,
    RunCommand,
    ShellCommand,
    ShellInlineFile,
    SourceContent,
    Stage,
    StopSignalCommand,
    UserCommand,
    VolumeCommand,
    WorkdirCommand,
)
from tlimage.frontends.dockerfile.instructions.parse import (
    INSTRUCTIONS,
    parse_instruction,
    parse_program,
)

__all__ = [
    "INSTRUCTIONS",
    "NETWORK_MODES",
    "SECURITY_MODES",
    "Expander",
    "AddCommand",
    "ArgCommand",
    "ArgDef",
    "CmdCommand",
    "Command",
    "CopyCommand",
    "DockerfileInstructionError",
    "EntrypointCommand",
    "EnvCommand",
    "ExposeCommand",
    "FromCommand",
    "HealthcheckCommand",
    "KeyValuePair",
    "LabelCommand",
    "MaintainerCommand",
    "Mount",
    "OnbuildCommand",
    "Program",
    "RunCommand",
    "ShellCommand",
    "ShellInlineFile",
    "SourceContent",
    "Stage",
    "StopSignalCommand",
    "UserCommand",
    "VolumeCommand",
    "WorkdirCommand",
    "parse_instruction",
    "parse_program",
]
