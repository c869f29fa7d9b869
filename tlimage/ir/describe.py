"""One-line, Dockerfile-like descriptions of steps, for progress output and errors."""

from __future__ import annotations

import json

from tlimage.ir import steps as s


def describe(step: s.Step, width: int = 100) -> str:
    text = _describe(step)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _cmd(command: tuple[str, ...], shell: bool) -> str:
    return command[0] if shell and command else json.dumps(list(command))


def _describe(step: s.Step) -> str:
    match step:
        case s.From(image=image, stage=stage, pin=pin):
            ref = image if image is not None else f"stage {stage}"
            return f"FROM {ref}{'@' + pin if pin else ''}"
        case s.Run(command=command, shell=shell):
            return f"RUN {_cmd(command, shell)}"
        case s.Copy(sources=src, dest=dest, from_=frm):
            return f"COPY {'--from=' + frm + ' ' if frm else ''}{' '.join(src)} {dest}"
        case s.Add(sources=src, dest=dest):
            return f"ADD {' '.join(src)} {dest}"
        case s.Env(vars=pairs):
            return "ENV " + " ".join(f"{k}={v}" for k, v in pairs)
        case s.Workdir(path=path):
            return f"WORKDIR {path}"
        case s.User(user=user):
            return f"USER {user}"
        case s.Arg(name=name, default=default):
            return f"ARG {name}" + ("" if default is None else f"={default}")
        case s.Label(labels=pairs):
            return "LABEL " + " ".join(f"{k}={json.dumps(v)}" for k, v in pairs)
        case s.Expose(ports=ports):
            return "EXPOSE " + " ".join(ports)
        case s.Entrypoint(command=command, shell=shell):
            return f"ENTRYPOINT {_cmd(command, shell)}"
        case s.Cmd(command=command, shell=shell):
            return f"CMD {_cmd(command, shell)}"
        case s.Shell(argv=argv):
            return f"SHELL {json.dumps(list(argv))}"
        case s.StopSignal(signal=sig):
            return f"STOPSIGNAL {sig}"
        case s.Healthcheck(test=test):
            return f"HEALTHCHECK {' '.join(test)}"
        case s.Volume(paths=paths):
            return f"VOLUME {json.dumps(list(paths))}"
        case s.Onbuild(instruction=instr):
            return f"ONBUILD {instr}"
    return step.op.upper()
