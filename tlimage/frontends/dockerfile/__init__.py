"""The Dockerfile front end, in BuildKit's three stages:

- `parser`: text to an untyped tree of raw argument cells (dumps like BuildKit's parser);
- `instructions`: that tree to typed instructions, with flags and arguments checked;
- `lower`: typed instructions to the IR.

`shell` is BuildKit's word lexer (variable expansion, quote removal, word splitting).
"""

from tlimage.frontends.dockerfile.instructions import (
    DockerfileInstructionError,
    Program,
    Stage,
    parse_program,
)
from tlimage.frontends.dockerfile.parser import (
    Directive,
    Dockerfile,
    DockerfileParseError,
    Heredoc,
    Instruction,
    ParseWarning,
    dump,
    parse,
    parse_file,
)

__all__ = [
    "Directive",
    "Dockerfile",
    "DockerfileInstructionError",
    "DockerfileParseError",
    "Heredoc",
    "Instruction",
    "ParseWarning",
    "Program",
    "Stage",
    "dump",
    "parse",
    "parse_file",
    "parse_program",
]
