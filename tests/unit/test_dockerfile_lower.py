"""Dockerfile lowering (stage three): scoping, expansion, stages, heredocs, mounts, config values,
names, spans and errors. Golden cases are in tests/golden/test_dockerfile_golden.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import ROOT
from tlimage import Image, ir
from tlimage.errors import DockerfileError, TlimageError
from tlimage.frontends.dockerfile.lower import (
    BaseImage,
    compile_dockerfile,
    default_image_name,
    load_dockerfile_image,
    platform_args,
)
from tlimage.frontends.dockerfile.lower_base import Problem
from tlimage.frontends.dockerfile.lower_config import normalize_workdir, port_spec
from tlimage.frontends.dockerfile.lower_run import SCRIPT_RUNNER


def lower(text: str, **options: object) -> ir.ImageDef:
    return compile_dockerfile(text, "Dockerfile", **options)  # type: ignore[arg-type]


def steps(text: str, **options: object) -> tuple[ir.Step, ...]:
    """The target stage's steps after its From."""
    return lower(text, **options).target_stage.steps[1:]


def error(text: str, **options: object) -> str:
    with pytest.raises(DockerfileError) as info:
        lower(text, **options)
    return info.value.render()


def env_of(text: str, **options: object) -> dict[str, str]:
    out: dict[str, str] = {}
    for s in steps(text, **options):
        if isinstance(s, ir.Env):
            out.update(s.vars)
    return out


# ------------------------------------------------------------------------------ names


@pytest.mark.parametrize(
    "rel, want",
    [
        ("my app/Dockerfile", "my-app"),
        ("x/web.Dockerfile", "web"),
        ("x/Dockerfile.prod", "prod"),
        ("x/api.dockerfile", "api"),
        ("svc/Containerfile", "svc"),
        ("x/Containerfile.dev", "dev"),
        ("x/worker-Dockerfile", "worker"),
        ("x/_hidden.Dockerfile", "hidden"),
        ("data tools!/Dockerfile.", "data-tools"),
    ],
)
def test_default_image_name_follows_the_file(tmp_path: Path, rel: str, want: str) -> None:
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    assert default_image_name(path) == want


def test_load_names_the_image_after_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "svc"
    folder.mkdir()
    (folder / "api.Dockerfile").write_text("FROM busybox\n")
    image = load_dockerfile_image(folder / "api.Dockerfile")
    assert (image.name, image.tag, image.target) == ("api", "latest", None)
    assert load_dockerfile_image(folder / "api.Dockerfile", name="other").name == "other"
    with pytest.raises(TlimageError, match="invalid image name"):
        load_dockerfile_image(folder / "api.Dockerfile", name="-bad name")


# ----------------------------------------------------------------------------- ARG / ENV


def test_build_args_change_the_digest_only_when_they_change_a_value() -> None:
    text = "FROM busybox\nARG VERSION=1.0\nRUN echo $VERSION\n"
    plain = lower(text)
    assert lower(text, build_args={"VERSION": "1.0"}).digest() == plain.digest()
    other = lower(text, build_args={"VERSION": "2.0"})
    assert other.digest() != plain.digest()
    assert other.target_stage.steps[1] == ir.Arg(name="VERSION", default="2.0")
    # An argument the Dockerfile does not declare changes nothing.
    assert lower(text, build_args={"OTHER": "x"}).digest() == plain.digest()


def test_meta_args_reach_a_stage_only_when_declared_again() -> None:
    text = "ARG V=1\nFROM busybox\nENV BEFORE=$V\nARG V\nENV AFTER=$V\n"
    assert env_of(text) == {"BEFORE": "", "AFTER": "1"}
    assert env_of(text, build_args={"V": "9"}) == {"BEFORE": "", "AFTER": "9"}


def test_meta_arg_defaults_expand_with_earlier_meta_args_and_build_args() -> None:
    text = "ARG A=a\nARG B=${A}-b\nFROM busybox\nARG B\nENV B=$B\n"
    assert env_of(text) == {"B": "a-b"}
    assert env_of(text, build_args={"A": "x"}) == {"B": "x-b"}
    assert env_of(text, build_args={"B": "given"}) == {"B": "given"}


def test_the_latest_of_arg_and_env_wins_as_in_buildkit() -> None:
    assert env_of("FROM busybox\nENV X=env\nARG X=arg\nENV Y=$X\n")["Y"] == "arg"
    assert env_of("FROM busybox\nARG X=arg\nENV X=env\nENV Y=$X\n")["Y"] == "env"


def test_env_pairs_expand_with_the_values_before_the_instruction() -> None:
    assert env_of("FROM busybox\nENV A=1\nENV A=2 B=$A\n") == {"A": "2", "B": "1"}


def test_arg_pairs_expand_one_after_the_other() -> None:
    assert steps("FROM busybox\nARG A=1 B=${A}2\n") == (
        ir.Arg(name="A", default="1"),
        ir.Arg(name="B", default="12"),
    )


def test_base_image_variables_are_visible() -> None:
    assert env_of("FROM debian-minimal\nENV L=$LANG P=$PATH\n") == {
        "L": "C.UTF-8",
        "P": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    }
    # An unknown image is assumed to have the default PATH only.
    assert env_of("FROM registered\nENV L=${LANG:-none}\n")["L"] == "none"


def test_resolve_base_supplies_a_registered_images_config() -> None:
    bases = {"py": BaseImage(env=(("PATH", "/venv/bin"), ("PYVER", "3.12")), workdir="/srv")}
    image = lower("FROM py\nENV P=$PATH V=$PYVER\nWORKDIR app\n", resolve_base=bases.get)
    assert image.target_stage.steps[1:] == (
        ir.Env(vars=(("P", "/venv/bin"), ("V", "3.12"))),
        ir.Workdir(path="/srv/app"),
    )


def test_run_cmd_entrypoint_shell_and_healthcheck_are_not_expanded() -> None:
    text = (
        'FROM busybox\nARG X=1\nRUN echo $X\nCMD echo $X\nENTRYPOINT ["$X"]\n'
        'SHELL ["/bin/$X"]\nHEALTHCHECK CMD test $X\n'
    )
    assert steps(text)[1:] == (
        ir.Run(command=("echo $X",)),
        ir.Cmd(command=("echo $X",), shell=True),
        ir.Entrypoint(command=("$X",)),
        ir.Shell(argv=("/bin/$X",)),
        ir.Healthcheck(test=("CMD-SHELL", "test $X")),
    )


def test_platform_args_describe_this_machine_and_can_be_overridden() -> None:
    args = platform_args()
    assert args["TARGETOS"] == args["BUILDOS"] == "linux"
    assert args["TARGETPLATFORM"].startswith("linux/" + args["TARGETARCH"])
    text = "FROM --platform=$TARGETPLATFORM busybox\nARG TARGETARCH\nENV A=$TARGETARCH\n"
    image = lower(text, build_args={"TARGETPLATFORM": "linux/s390x", "TARGETARCH": "s390x"})
    assert image.target_stage.base.platform == "linux/s390x"
    assert image.target_stage.steps[-1] == ir.Env(vars=(("A", "s390x"),))


def test_escape_directive_applies_to_expansion() -> None:
    text = "# escape=`\nFROM busybox\nENV A=x B=`$A C=C:\\dir\n"
    assert env_of(text) == {"A": "x", "B": "$A", "C": "C:\\dir"}


# --------------------------------------------------------------------------------- stages

MULTI = """\
FROM busybox AS Deps
RUN fetch
FROM busybox AS build
COPY --from=DEPS /d /d
FROM build AS test
RUN test
FROM busybox AS docs
RUN docs
FROM scratch
COPY --from=1 /out /out
RUN --mount=from=deps,target=/d true
"""


def test_stages_references_and_what_the_target_needs() -> None:
    image = lower(MULTI)
    assert [s.name for s in image.stages] == ["deps", "build", "test", "docs", "stage-4"]
    last = image.target_stage
    assert last.steps[1] == ir.Copy(sources=("/out",), dest="/out", from_="build")
    assert last.steps[2].mounts == (ir.BindMount("/d", from_="deps"),)
    assert [s.name for s in image.needed_stages()] == ["deps", "build", "stage-4"]
    assert image.parallel_groups() == (("deps",), ("build",), ("stage-4",))
    test = lower(MULTI, target="TEST")
    assert test.target == "test"
    assert test.target_stage.base == ir.From(stage="build")
    assert [s.name for s in test.needed_stages()] == ["deps", "build", "test"]


def test_a_lone_unnamed_stage_is_main_and_unnamed_stages_are_numbered() -> None:
    assert [s.name for s in lower("FROM busybox\n").stages] == ["main"]
    names = [s.name for s in lower("FROM busybox AS stage-1\nFROM busybox\n").stages]
    assert names == ["stage-1", "stage-1_"]


def test_from_a_later_stage_name_is_an_image() -> None:
    image = lower("FROM later\nFROM busybox AS later\n", target="later")
    assert image.stages[0].base == ir.From(image="later")


def test_child_stages_inherit_variables_workdir_and_run_onbuild_triggers() -> None:
    text = (
        "FROM busybox AS base\nARG V=1\nENV E=e\nWORKDIR /w\nONBUILD RUN echo $V\n"
        "FROM base\nENV X=$V$E\nWORKDIR sub\n"
    )
    image = lower(text)
    child = image.target_stage
    assert child.steps == (
        ir.From(stage="base"),
        ir.Run(command=("echo $V",)),
        ir.Env(vars=(("X", "1e"),)),
        ir.Workdir(path="/w/sub"),
    )
    # Trigger steps point at the FROM line that runs them.
    assert child.meta[1].span == child.meta[0].span
    assert child.meta[0].span is not None and child.meta[0].span.line == 6


def test_an_error_in_a_stage_the_target_does_not_need_leaves_it_out() -> None:
    text = (
        "FROM busybox AS bad\nENV X=${U:?unset}\n"
        "FROM bad AS worse\n"
        "FROM busybox AS uses\nCOPY --from=worse /a /b\n"
        "FROM busybox AS ok\n"
    )
    assert [s.name for s in lower(text).stages] == ["ok"]
    assert "U: unset" in error(text, target="uses")


def test_every_from_line_is_checked_even_in_stages_not_needed() -> None:
    """As BuildKit, which expands all FROM lines before it looks at the target."""
    text = "ARG B\nFROM busybox AS ok\nFROM ${B} AS unused\n"
    assert "Dockerfile:3:6: base name (${B}) should not be blank" in error(text, target="ok")


def test_unknown_target_lists_the_stages() -> None:
    text = "FROM busybox AS build\nFROM build AS release\n"
    message = error(text, target="relase")
    assert 'target stage "relase" could not be found (did you mean release?)' in message
    assert "hint: the named stages are: build, release" in message
    assert "names no stages" in error("FROM busybox\n", target="x")


# -------------------------------------------------------------------------------- RUN


def test_run_heredocs() -> None:
    text = (
        "FROM busybox\n"
        "RUN <<EOF\necho a\nEOF\n"
        "RUN <<-EOF\n\techo b\n\tEOF\n"
        'RUN python3 <<EOF > /x\nprint("c")\nEOF\n'
        "RUN <<EOF\n#!/bin/sh\necho d\nEOF\n"
    )
    assert steps(text) == (
        ir.Run(command=("echo a\n",)),
        ir.Run(command=("echo b\n",)),
        ir.Run(command=('python3 <<EOF > /x\nprint("c")\nEOF',)),
        ir.Run(command=("/bin/sh", "-c", SCRIPT_RUNNER, "EOF", "#!/bin/sh\necho d\n"), shell=False),
    )


def test_script_runner_runs_the_script_with_its_interpreter_and_cleans_up(tmp_path: Path) -> None:
    script = f'#!{sys.executable}\nimport sys\nprint("from python", sys.argv[0].endswith("EOF"))\n'
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    out = subprocess.run(
        ["/bin/sh", "-c", SCRIPT_RUNNER, "EOF", script], capture_output=True, text=True, env=env
    )
    assert (out.returncode, out.stdout) == (0, "from python True\n")
    assert list(tmp_path.iterdir()) == []
    failing = subprocess.run(["/bin/sh", "-c", SCRIPT_RUNNER, "X", "#!/bin/sh\nexit 7\n"], env=env)
    assert failing.returncode == 7


def test_run_mounts_are_typed_with_buildkits_defaults() -> None:
    text = (
        "FROM busybox AS deps\nFROM busybox\nWORKDIR /w\nARG T=cache\n"
        "RUN --mount=type=cache,target=$T,ro --mount=type=bind,from=Deps,rw,target=/d "
        "--mount=type=secret,id=s,target=/run/s,readonly --mount=type=tmpfs,target=/t,rw "
        "--mount=type=cache,target=/c,mode=755,uid=1 true\n"
    )
    [*_, run] = steps(text)
    assert run.mounts == (
        ir.CacheMount("/w/cache", id="/w/cache", readonly=True),
        ir.BindMount("/d", from_="deps", readonly=False),
        ir.SecretMount("s", target="/run/s"),
        ir.TmpfsMount("/t"),
        ir.CacheMount("/c", id="/c", mode=0o755, uid=1),
    )


def test_dsl_and_dockerfile_mounts_agree_when_spelled_the_same() -> None:
    dsl = Image("m").run("make", options={"mounts": ["type=cache,target=/c,sharing=locked"]})
    docker = lower("FROM debian-minimal\nRUN --mount=type=cache,target=/c,sharing=locked make\n")
    assert docker.digest() == dsl.to_ir().digest()


# ------------------------------------------------------------------------- COPY / ADD


def test_copy_heredoc_files_take_the_chmod_and_expand_unless_quoted() -> None:
    text = "FROM busybox\nARG A=1\nCOPY --chmod=0750 <<X <<'Y' /d/\n$A \"q\"\nX\n$A\nY\n"
    [_, copy] = steps(text)
    assert copy.inline == (
        ir.InlineFile("X", '1 "q"\n', 0o750),
        ir.InlineFile("Y", "$A\n", 0o750),
    )


def test_copy_from_index_name_and_image() -> None:
    text = "FROM busybox AS a\nFROM busybox\nCOPY --from=0 /x /x\nCOPY --from=A /y /y\n"
    text += "COPY --from=tools:1.2 /z /z\n"
    assert [s.from_ for s in steps(text)] == ["a", "a", "tools:1.2"]


@pytest.mark.parametrize(
    "line, message",
    [
        ("COPY --from=0 /a /b", 'cannot copy from stage "0", it needs to be defined before'),
        ("COPY --from=-1 /a /b", "invalid stage index -1"),
        ("COPY --from=${S} /a /b", "variable expansion is not supported for --from"),
        ("RUN --mount=from=main,target=/m true", 'cannot mount from stage "main"'),
        ("ADD --unpack a.tar /a", "ADD --unpack is not supported"),
    ],
)
def test_copy_and_mount_sources_must_come_before(line: str, message: str) -> None:
    assert message in error(f"FROM busybox AS main\n{line}\n")


# ------------------------------------------------------------------------ config values


@pytest.mark.parametrize(
    "raw, want",
    [
        ("80", "80/tcp"),
        ("53/UDP", "53/udp"),
        ("0080", "80/tcp"),
        ("8000-8010", "8000-8010/tcp"),
        ("7-7/sctp", "7/sctp"),
        ("8080:80", "80/tcp"),
        ("127.0.0.1:8080:80/udp", "80/udp"),
        ("[::1]:9000-9001:90-91", "90-91/tcp"),
        ("1000-2000:80", "80/tcp"),
    ],
)
def test_port_specs(raw: str, want: str) -> None:
    assert port_spec(raw) == want


@pytest.mark.parametrize(
    "raw, message",
    [
        ("80/http", "invalid proto: http"),
        ("/tcp", "no port specified: /tcp<empty>"),
        ("65536", "invalid containerPort: 65536"),
        ("9-8", "invalid containerPort: 9-8"),
        ("x:80:80", "invalid IP address: x"),
        ("1-2:3-5", "invalid ranges specified for container and host Ports: 3-5 and 1-2"),
        ("a:80", "invalid hostPort: a"),
    ],
)
def test_bad_port_specs(raw: str, message: str) -> None:
    with pytest.raises(Problem) as info:
        port_spec(raw)
    assert info.value.message == message


def test_expose_splits_expanded_words_and_drops_repeats() -> None:
    text = 'FROM busybox\nARG P="81 82/udp 81"\nEXPOSE $P 80\n'
    assert steps(text)[-1] == ir.Expose(ports=("81/tcp", "82/udp", "80/tcp"))


@pytest.mark.parametrize("sig", ["SIGTERM", "term", "9", "SIGRTMIN+3", "RTMAX-1", "-1"])
def test_stopsignal_accepts_what_moby_parses(sig: str) -> None:
    assert steps(f"FROM busybox\nSTOPSIGNAL {sig}\n") == (ir.StopSignal(signal=sig),)


@pytest.mark.parametrize("sig", ["0", "SIGNOPE", "RTMIN+16"])
def test_stopsignal_rejects_the_rest(sig: str) -> None:
    assert f"invalid signal: {sig}" in error(f"FROM busybox\nSTOPSIGNAL {sig}\n")


def test_workdir_normalization() -> None:
    assert normalize_workdir("/", "a") == "/a"
    assert normalize_workdir("/a/b", "../c/./") == "/a/c"
    assert normalize_workdir("/a", "//x//y/") == "/x/y"
    assert normalize_workdir("/a", "../../..") == "/"


@given(st.lists(st.text(alphabet="ab./", min_size=1, max_size=6), min_size=1, max_size=4))
def test_workdir_is_always_absolute_and_clean(parts: list[str]) -> None:
    wd = "/"
    for p in parts:
        wd = normalize_workdir(wd, p)
        assert wd.startswith("/") and "//" not in wd and "/./" not in wd + "/"
        assert normalize_workdir("/elsewhere", wd) == wd


def test_maintainer_is_a_label_and_empty_command_forms() -> None:
    text = "FROM busybox\nMAINTAINER me <m@x>\nENTRYPOINT []\nCMD []\n"
    assert steps(text) == (
        ir.Label(labels=(("maintainer", "me <m@x>"),)),
        ir.Entrypoint(command=()),
        ir.Cmd(command=()),
    )


# ----------------------------------------------------------------------- spans and errors


def test_spans_cover_the_instruction_and_its_heredocs() -> None:
    image = lower("FROM busybox\nRUN <<EOF\necho\nEOF\nENV A=1 \\\n  B=2\n")
    spans = [m.span for m in image.target_stage.meta]
    assert spans == [
        ir_span(1, 1, 1, 13),
        ir_span(2, 1, 4, 4),
        ir_span(5, 1, 6, 6),
    ]


def ir_span(line: int, col: int, end_line: int, end_col: int):  # noqa: ANN201
    from tlimage.source import Span

    return Span("Dockerfile", line, col, end_line, end_col)


def test_expansion_errors_point_at_the_word() -> None:
    message = error("FROM busybox\nLABEL a=ok b=${X:?needed}\n")
    assert message.splitlines() == [
        'Dockerfile:2:14: failed to process "${X:?needed}": X: needed',
        "   2 | LABEL a=ok b=${X:?needed}",
        "                    ^^^^^^^^^^^^",
    ]


def test_errors_name_the_onbuild_trigger() -> None:
    text = "FROM busybox AS base\nONBUILD COPY --from=7 /a /b\nFROM base\n"
    message = error(text)
    assert message.startswith("Dockerfile:3:1: invalid stage index 7")
    assert "hint: the parent stage's ONBUILD trigger `COPY --from=7 /a /b` runs here" in message


# ----------------------------------------------------------------------------- properties

_VALUES = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=30)


@settings(max_examples=150, deadline=None)
@given(key=st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True), value=_VALUES)
def test_env_in_double_quotes_equals_the_dsl_env(key: str, value: str) -> None:
    quoted = "".join("\\" + c if c in '"$\\' else c for c in value)
    docker = lower(f'FROM debian-minimal\nENV {key}="{quoted}"\n')
    dsl = Image("x").env(key, value).to_ir()
    assert docker.target_stage.steps == dsl.target_stage.steps
    assert docker.digest() == dsl.digest()


# ------------------------------------------------------------------------------------ CLI


def test_cli_compiles_a_dockerfile_with_build_args_and_target(tmp_path: Path) -> None:
    folder = tmp_path / "svc"
    folder.mkdir()
    (folder / "Dockerfile").write_text(
        "FROM busybox AS base\nARG V=1\nFROM base AS app\nARG V\nLABEL v=$V\n"
    )

    def tl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tlimage", "sbx", "image", "compile", *args],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    out = tl(str(folder / "Dockerfile"), "--build-arg", "V=7", "--target", "base")
    assert out.returncode == 0, out.stderr
    assert 'image name="svc" tag="latest" target="base"' in out.stdout
    assert 'arg name="V" default="7"' in out.stdout
    (folder / "Dockerfile").write_text("FROM busybox\nSTOPSIGNAL NOPE\n")
    bad = tl(str(folder / "Dockerfile"))
    assert bad.returncode == 2
    assert "Dockerfile:2:12: invalid signal: NOPE" in bad.stderr
    assert "^^^^" in bad.stderr


@settings(max_examples=300, deadline=None)
@given(
    word=st.text(st.characters(blacklist_categories=("Cs",)), max_size=40),
    escape=st.sampled_from("\\`"),
)
def test_words_without_dollar_quotes_or_escape_expand_to_themselves(word: str, escape: str) -> None:
    """The lowering skips the lexer for such words; the lexer agrees."""
    from tlimage.frontends.dockerfile.shell import ShellLex

    plain = "".join(c for c in word if c not in "$'\"" + escape)
    assert ShellLex(escape).process_word(plain, {"A": "x"}) == plain
