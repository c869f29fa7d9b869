"""Typed instructions (stage two): one test per instruction, flags, mounts, stages, expansion,
and the negative fixtures in fixtures/dockerfile-negative/<case>/{Dockerfile,expected_error}."""

from __future__ import annotations

from pathlib import Path

import pytest

from tlimage.errors import DockerfileError
from tlimage.frontends.dockerfile import instructions as ins
from tlimage.frontends.dockerfile import parse
from tlimage.frontends.dockerfile.instructions import (
    DockerfileInstructionError,
    Mount,
    parse_instruction,
    parse_program,
)
from tlimage.frontends.dockerfile.shell import process_word

NEGATIVE = Path(__file__).resolve().parents[2] / "fixtures" / "dockerfile-negative"


def cmd(line: str, prefix: str = "FROM scratch\n") -> ins.Command:
    """The typed form of the last instruction of `prefix + line`."""
    ast = parse(prefix + line, "Dockerfile")
    return parse_instruction(ast.instructions[-1], ast)


def error(text: str) -> str:
    with pytest.raises(DockerfileInstructionError) as info:
        parse_program(parse(text, "Dockerfile"))
    return str(info.value)


# ------------------------------------------------------------------------------ instructions


def test_from() -> None:
    c = cmd("FROM --platform=linux/arm64 Alpine:3.20 As Build", prefix="")
    assert isinstance(c, ins.FromCommand)
    assert (c.base, c.stage_name, c.platform) == ("Alpine:3.20", "build", "linux/arm64")
    assert (c.span.line, c.span.col) == (1, 1)
    assert cmd("FROM debian", prefix="").stage_name == ""


def test_from_comment_describes_stage() -> None:
    c = cmd("# build compiles the app\nFROM golang AS build", prefix="")
    assert c.comment == "compiles the app"


def test_run_shell_and_exec_form() -> None:
    c = cmd("RUN echo $HOME")
    assert isinstance(c, ins.RunCommand)
    assert (c.cmd, c.prepend_shell, c.network, c.security) == (
        ("echo $HOME",),
        True,
        "default",
        "sandbox",
    )
    c = cmd('RUN ["echo", "$HOME"]')
    assert (c.cmd, c.prepend_shell) == (("echo", "$HOME"), False)


def test_run_flags_and_heredoc() -> None:
    c = cmd(
        "RUN --network=none --security=insecure --mount=type=tmpfs,target=/t,size=64m"
        " <<EOF\nset -e\nEOF\n"
    )
    assert (c.network, c.security) == ("none", "insecure")
    assert c.mounts == (Mount(type="tmpfs", target="/t", readonly=False, size=64 << 20),)
    assert c.files == (ins.ShellInlineFile("EOF", "set -e\n", False),)
    assert c.flags_used == ("network", "security", "mount")


@pytest.mark.parametrize(
    "spec, mount",
    [
        ("type=cache,target=/root/.cache", Mount(type="cache", target="/root/.cache", readonly=False)),
        (
            "type=cache,id=pip,target=/c,sharing=locked,mode=0700,uid=1000,gid=1000",
            Mount(type="cache", target="/c", readonly=False, id="pip", sharing="locked",
                  mode=0o700, uid=1000, gid=1000),
        ),
        ("target=/src", Mount(type="bind", target="/src", readonly=True)),
        ("type=bind,source=.,target=/src,rw", Mount(type="bind", source=".", target="/src", readonly=False)),
        ("type=bind,from=build,src=/out,dst=/in", Mount(from_="build", source="/out", target="/in")),
        ("type=secret,id=npmrc,target=/root/.npmrc,required", Mount(type="secret", id="npmrc",
                                                                   target="/root/.npmrc", required=True)),
        ("type=secret,id=tok,env=TOKEN", Mount(type="secret", id="tok", env="TOKEN")),
        ("type=ssh,required=true", Mount(type="ssh", required=True)),
        # Quotes reach the CSV reader only when escaped: the flag scanner removes plain ones.
        ('type=cache,\\"target=/a,b\\"', Mount(type="cache", target="/a,b", readonly=False)),
        ("TYPE=CACHE,readonly=false,target=/x", Mount(type="cache", target="/x", readonly=False)),
    ],
)  # fmt: skip
def test_mounts(spec: str, mount: Mount) -> None:
    c = cmd(f"RUN --mount={spec} make")
    assert c.mounts == (mount,)


def test_mount_values_with_variables_are_checked_after_expansion() -> None:
    c = cmd("RUN --mount=type=$T,target=/x,mode=0700 make")
    assert c.mount_specs == ("type=$T,target=/x,mode=0700",)
    env = {"T": "cache"}
    expanded = c.expand(lambda w: process_word(w, env))
    assert expanded.mounts == (Mount(type="cache", target="/x", readonly=False, mode=0o700),)
    with pytest.raises(DockerfileInstructionError, match='mode not allowed for "bind"'):
        c.expand(lambda w: process_word(w, {"T": "bind"}))


def test_cmd_and_entrypoint() -> None:
    c = cmd('CMD ["--help"]')
    assert isinstance(c, ins.CmdCommand) and c.cmd == ("--help",) and not c.prepend_shell
    c = cmd("CMD exec app --port 80")
    assert c.cmd == ("exec app --port 80",) and c.prepend_shell
    e = cmd("ENTRYPOINT []")
    assert isinstance(e, ins.EntrypointCommand) and e.cmd is None
    assert cmd('ENTRYPOINT ["tini", "--"]').cmd == ("tini", "--")


def test_shell() -> None:
    c = cmd('SHELL ["/bin/bash", "-o", "pipefail", "-c"]')
    assert isinstance(c, ins.ShellCommand) and c.shell == ("/bin/bash", "-o", "pipefail", "-c")


def test_copy() -> None:
    c = cmd(
        "COPY --from=build --chown=app:app --chmod=0644 --link --parents "
        "--exclude=*.md --exclude=.git a/ b/ /dst/"
    )
    assert isinstance(c, ins.CopyCommand)
    assert (c.sources, c.dest, c.from_, c.chown, c.chmod) == (
        ("a/", "b/"),
        "/dst/",
        "build",
        "app:app",
        "0644",
    )
    assert (c.link, c.parents, c.excludes) == (True, True, ("*.md", ".git"))
    assert cmd('COPY ["my file", "/d"]').sources == ("my file",)


def test_copy_heredoc_contents() -> None:
    c = cmd("COPY <<-EOF <<'RAW' x /etc/\n\tline $A\n\tEOF\n$B\nRAW\n")
    assert c.sources == ("x",)
    assert c.contents == (
        ins.SourceContent("EOF", "line $A\n", True),
        ins.SourceContent("RAW", "$B\n", False),
    )


def test_add() -> None:
    c = cmd(
        "ADD --checksum=sha256:24454f83 --keep-git-dir --unpack=false --chmod=755 "
        "https://example.com/a.tar.gz /opt/"
    )
    assert isinstance(c, ins.AddCommand)
    assert (c.sources, c.dest, c.checksum, c.keep_git_dir, c.unpack, c.chmod) == (
        ("https://example.com/a.tar.gz",), "/opt/", "sha256:24454f83", True, False, "755",
    )  # fmt: skip
    assert cmd("ADD a.tgz /x").unpack is None


def test_env_pairs() -> None:
    c = cmd('ENV A=1 B="two words"')
    assert isinstance(c, ins.EnvCommand)
    assert c.env == (ins.KeyValuePair("A", "1"), ins.KeyValuePair("B", '"two words"'))
    legacy = cmd("ENV PATH /usr/local/bin:$PATH")
    assert legacy.env == (ins.KeyValuePair("PATH", "/usr/local/bin:$PATH", no_delim=True),)
    env = {"PATH": "/bin"}
    expanded = c.expand(lambda w: process_word(w, env))
    assert expanded.env[1].value == "two words"
    assert legacy.expand(lambda w: process_word(w, env)).env[0].value == "/usr/local/bin:/bin"


def test_label() -> None:
    c = cmd('LABEL org.opencontainers.image.title="My app" version=1')
    assert isinstance(c, ins.LabelCommand)
    assert [(p.key, p.value) for p in c.labels] == [
        ("org.opencontainers.image.title", '"My app"'),
        ("version", "1"),
    ]


def test_arg() -> None:
    c = cmd("# VERSION the release\nARG VERSION=1.0 TARGETOS EMPTY=")
    assert isinstance(c, ins.ArgCommand)
    assert c.args == (
        ins.ArgDef("VERSION", "1.0", "the release"),
        ins.ArgDef("TARGETOS", None),
        ins.ArgDef("EMPTY", ""),
    )


def test_workdir_user_stopsignal_maintainer() -> None:
    assert cmd("WORKDIR /app/$NAME").path == "/app/$NAME"
    assert cmd("USER app:app").user == "app:app"
    assert cmd("STOPSIGNAL SIGQUIT").signal == "SIGQUIT"
    assert cmd("MAINTAINER someone <a@b>").maintainer == "someone <a@b>"


def test_expose_sorted_and_expanded() -> None:
    c = cmd("EXPOSE 8080/tcp 53/udp 443")
    assert c.ports == ("443", "53/udp", "8080/tcp")
    assert c.expand(lambda w: process_word(w, {"P": "1 2"})).ports == c.ports
    assert cmd("EXPOSE $P").expand(lambda w: process_word(w, {"P": "1 2"})).ports == ("1", "2")


def test_volume() -> None:
    assert cmd('VOLUME ["/data", "/logs"]').volumes == ("/data", "/logs")
    assert cmd("VOLUME /a /b").volumes == ("/a", "/b")


def test_healthcheck() -> None:
    c = cmd(
        "HEALTHCHECK --interval=1m30s --timeout=500ms --start-period=1.5s "
        "--start-interval=2s --retries=4 CMD curl -f http://localhost/"
    )
    assert isinstance(c, ins.HealthcheckCommand)
    assert c.test == ("CMD-SHELL", "curl -f http://localhost/")
    assert (c.interval, c.timeout, c.start_period, c.start_interval, c.retries) == (
        90_000_000_000, 500_000_000, 1_500_000_000, 2_000_000_000, 4,
    )  # fmt: skip
    assert cmd('HEALTHCHECK CMD ["/bin/check", "-q"]').test == ("CMD", "/bin/check", "-q")
    assert cmd("HEALTHCHECK --interval=0s CMD x").interval == 0
    # As BuildKit, NONE ignores flags.
    assert cmd("HEALTHCHECK --bogus=1 NONE").test == ("NONE",)


def test_onbuild() -> None:
    c = cmd("ONBUILD COPY <<EOF /x\nhello\nEOF\n")
    assert isinstance(c, ins.OnbuildCommand)
    assert c.trigger == "COPY"
    assert c.expression == "COPY <<EOF /x\nhello\nEOF"
    assert cmd("onbuild run make").expression == "run make"


def test_every_instruction_has_a_typed_form() -> None:
    assert set(ins.INSTRUCTIONS) == {
        "add", "arg", "cmd", "copy", "entrypoint", "env", "expose", "from", "healthcheck",
        "label", "maintainer", "onbuild", "run", "shell", "stopsignal", "user", "volume",
        "workdir",
    }  # fmt: skip


# ----------------------------------------------------------------------------- flags, stages


def test_flag_rules() -> None:
    assert cmd("COPY --link=FALSE a b").link is False
    assert cmd("COPY --link a b").link is True
    assert "missing a value on flag: link" in error("FROM a\nCOPY --link= a b")
    assert "duplicate flag specified: network" in error(
        "FROM a\nRUN --network=none --network=host x"
    )
    assert "unknown flag: platform" in error("FROM a\nCOPY --platform=x a b")
    assert "unknown flag: from" in error("FROM a\nADD --from=x a b")


def test_program_stages_and_meta_args() -> None:
    prog = parse_program(
        parse("ARG TAG=3.20\nFROM alpine:$TAG AS base\nRUN a\nFROM base\nCOPY --from=base / /\n")
    )
    assert [a.args[0].key for a in prog.meta_args] == ["TAG"]
    assert [(s.index, s.name, s.base) for s in prog.stages] == [
        (0, "base", "alpine:$TAG"),
        (1, "", "base"),
    ]
    assert [c.name for c in prog.stages[0].commands] == ["run"]
    assert prog.stage("BASE") is prog.stages[0]
    assert prog.stage(1) is prog.stages[1]


def test_copy_expand_fields() -> None:
    c = cmd("COPY --chown=$U --chmod=$M $SRC /home/$U/")
    out = c.expand(lambda w: process_word(w, {"U": "app", "M": "640", "SRC": "a"}))
    assert (out.chown, out.chmod, out.sources, out.dest) == ("app", "640", ("a",), "/home/app/")
    with pytest.raises(DockerfileInstructionError, match="invalid chmod parameter"):
        c.expand(lambda w: process_word(w, {"M": "9"}))


def test_errors_are_dockerfile_errors_with_caret() -> None:
    text = error("FROM a\nRUN --mount=type=cache,target=/x,mode=0999 make\n")
    assert text.splitlines() == [
        "Dockerfile:2:34: invalid value 0999 for mode",
        "   2 | RUN --mount=type=cache,target=/x,mode=0999 make",
        " " * 40 + "^" * len("mode=0999"),
    ]


# ------------------------------------------------------------------------- negative fixtures


def _negative_cases():
    return [pytest.param(p, id=p.name) for p in sorted(NEGATIVE.iterdir()) if p.is_dir()]


@pytest.mark.parametrize("case", _negative_cases())
def test_negative_fixture(case: Path) -> None:
    expected = (case / "expected_error").read_text(encoding="utf-8")
    with pytest.raises(DockerfileError) as info:
        parse_program(parse((case / "Dockerfile").read_bytes(), "Dockerfile"))
    assert str(info.value) + "\n" == expected


def test_instructions_that_ignore_flags_warn() -> None:
    prog = parse_program(
        parse("ARG --x=1 A\nFROM a\nSTOPSIGNAL --y TERM\nHEALTHCHECK --z NONE\n", "Dockerfile")
    )
    assert prog.meta_args[0].args == (ins.ArgDef("A"),)
    assert [(w.line, w.short) for w in prog.warnings] == [
        (1, "ARG ignores flags, as BuildKit does: --x=1"),
        (3, "STOPSIGNAL ignores flags, as BuildKit does: --y"),
        (4, "HEALTHCHECK ignores flags, as BuildKit does: --z"),
    ]
