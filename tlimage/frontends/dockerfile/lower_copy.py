"""Lowering of COPY and ADD (BuildKit's `dispatchCopy`): heredoc sources become inline
files, `--from` becomes a stage's IR name or stays an image name. Sources and destination
are kept as written (after expansion); the builder resolves a relative destination against the
working directory and reads the context."""

from __future__ import annotations

from collections.abc import Callable

from tlimage import ir
from tlimage.frontends.dockerfile import instructions as ins
from tlimage.frontends.dockerfile.lower_base import Problem
from tlimage.frontends.dockerfile.shell import ShellLex

# COPY <<EOF bodies expand with a lexer that leaves quotes alone (BuildKit's ExpandRaw, which
# always uses `\` as the escape, whatever the file's escape directive says).
_RAW_LEX = ShellLex("\\", skip_process_quotes=True)


def inline_files(
    contents: tuple[ins.SourceContent, ...],
    chmod: str,
    expand_raw: Callable[[str], str],
) -> tuple[ir.InlineFile, ...]:
    """`--chmod` applies to inline files too; without it they are 0644 (the builder's
    default for `mode=None`)."""
    mode = int(chmod, 8) if chmod else None
    return tuple(
        ir.InlineFile(name=c.path, content=expand_raw(c.data) if c.expand else c.data, mode=mode)
        for c in contents
    )


def lower_copy(
    cmd: ins.CopyCommand,
    resolve_from: Callable[[str], str],
    expand_raw: Callable[[str], str],
) -> ir.Copy:
    """`cmd` is expanded already; `resolve_from` maps the `--from` value to a stage's IR name
    or an image name."""
    return ir.Copy(
        sources=cmd.sources,
        dest=cmd.dest,
        from_=resolve_from(cmd.from_) if cmd.from_ else None,
        chown=cmd.chown or None,
        chmod=cmd.chmod or None,
        link=cmd.link,
        parents=cmd.parents,
        excludes=cmd.excludes,
        inline=inline_files(cmd.contents, cmd.chmod, expand_raw),
    )


def lower_add(cmd: ins.AddCommand, expand_raw: Callable[[str], str]) -> ir.Add:
    if cmd.unpack is not None:
        raise Problem(
            "ADD --unpack is not supported: local archives are always unpacked and URLs never",
            "--unpack",
        )
    return ir.Add(
        sources=cmd.sources,
        dest=cmd.dest,
        chown=cmd.chown or None,
        chmod=cmd.chmod or None,
        link=cmd.link,
        excludes=cmd.excludes,
        checksum=cmd.checksum or None,
        keep_git_dir=cmd.keep_git_dir,
        inline=inline_files(cmd.contents, cmd.chmod, expand_raw),
    )


def raw_expander(env: dict[str, str]) -> Callable[[str], str]:
    return lambda text: _RAW_LEX.process_word(text, env)
