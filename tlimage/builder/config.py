"""The runtime config an image carries (env, workdir, user, entrypoint, cmd, ...), and how each
config step changes it. Docker's rules where they are observable: ENTRYPOINT resets a CMD
inherited from the base; relative WORKDIRs resolve against the current one; ARG values are
visible to RUN steps but not kept in the image."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field, replace
from typing import Any

from tlimage import ir

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class ImageConfig:
    env: tuple[tuple[str, str], ...] = (("PATH", DEFAULT_PATH),)
    workdir: str = "/"
    user: str = "root"
    shell: tuple[str, ...] = ("/bin/sh", "-c")
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    cmd_from_base: bool = False
    labels: tuple[tuple[str, str], ...] = ()
    exposed_ports: tuple[str, ...] = ()
    volumes: tuple[str, ...] = ()
    stopsignal: str | None = None
    healthcheck: dict[str, Any] | None = None
    onbuild: tuple[str, ...] = ()
    # Build-time only: ARG values in scope (never written to the image).
    args: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    # -- reading ----------------------------------------------------------------------------

    def env_dict(self) -> dict[str, str]:
        return dict(self.env)

    def run_env(self) -> dict[str, str]:
        """What a RUN step sees: ARG values, overridden by ENV (as in Docker)."""
        out = dict(self.args)
        out.update(self.env)
        return out

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "env": [f"{k}={v}" for k, v in self.env],
            "workdir": self.workdir,
            "user": self.user,
            "shell": list(self.shell),
            "entrypoint": list(self.entrypoint),
            "cmd": list(self.cmd),
            "labels": dict(self.labels),
            "exposed_ports": list(self.exposed_ports),
            "volumes": list(self.volumes),
        }
        if self.stopsignal:
            out["stopsignal"] = self.stopsignal
        if self.healthcheck:
            out["healthcheck"] = self.healthcheck
        if self.onbuild:
            out["onbuild"] = list(self.onbuild)
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ImageConfig:
        return cls(
            env=tuple(tuple(e.split("=", 1)) for e in obj.get("env", []))  # type: ignore[misc]
            or cls.env,
            workdir=obj.get("workdir", "/"),
            user=obj.get("user", "root"),
            shell=tuple(obj.get("shell", ("/bin/sh", "-c"))),
            entrypoint=tuple(obj.get("entrypoint", ())),
            cmd=tuple(obj.get("cmd", ())),
            cmd_from_base=bool(obj.get("cmd")),
            labels=tuple(obj.get("labels", {}).items()),
            exposed_ports=tuple(obj.get("exposed_ports", ())),
            volumes=tuple(obj.get("volumes", ())),
            stopsignal=obj.get("stopsignal"),
            healthcheck=obj.get("healthcheck"),
            onbuild=tuple(obj.get("onbuild", ())),
        )

    # -- changing ---------------------------------------------------------------------------

    def resolve(self, path: str) -> str:
        """An absolute, normalized path; relative ones resolve against the workdir."""
        return posixpath.normpath(posixpath.join(self.workdir, path)) if path else self.workdir

    def command_argv(self, command: tuple[str, ...], shell: bool) -> tuple[str, ...]:
        return (*self.shell, command[0]) if shell else command

    def apply(self, step: ir.Step, build_args: dict[str, str] | None = None) -> ImageConfig:
        """The config after a step. Filesystem steps leave it unchanged (WORKDIR aside)."""
        if isinstance(step, ir.Env):
            env = dict(self.env)
            for k, v in step.vars:
                env.pop(k, None)
                env[k] = v
            return replace(self, env=tuple(env.items()))
        if isinstance(step, ir.Arg):
            value = (build_args or {}).get(step.name, step.default)
            args = dict(self.args)
            if value is None:
                args.pop(step.name, None)
            else:
                args[step.name] = value
            return replace(self, args=tuple(args.items()))
        if isinstance(step, ir.Workdir):
            return replace(self, workdir=self.resolve(step.path))
        if isinstance(step, ir.User):
            return replace(self, user=step.user)
        if isinstance(step, ir.Shell):
            return replace(self, shell=step.argv)
        if isinstance(step, ir.Entrypoint):
            cmd = () if self.cmd_from_base else self.cmd
            return replace(self, entrypoint=self.command_argv(step.command, step.shell)
                           if step.command else (), cmd=cmd, cmd_from_base=False)  # fmt: skip
        if isinstance(step, ir.Cmd):
            return replace(self, cmd=self.command_argv(step.command, step.shell)
                           if step.command else (), cmd_from_base=False)  # fmt: skip
        if isinstance(step, ir.Label):
            labels = dict(self.labels)
            labels.update(step.labels)
            return replace(self, labels=tuple(labels.items()))
        if isinstance(step, ir.Expose):
            ports = tuple(dict.fromkeys((*self.exposed_ports, *step.ports)))
            return replace(self, exposed_ports=ports)
        if isinstance(step, ir.Volume):
            return replace(self, volumes=tuple(dict.fromkeys((*self.volumes, *step.paths))))
        if isinstance(step, ir.StopSignal):
            return replace(self, stopsignal=step.signal)
        if isinstance(step, ir.Healthcheck):
            hc = {k: v for k, v in ir.to_obj(step).items() if v is not None}
            hc.setdefault("test", ["NONE"])
            return replace(self, healthcheck=hc)
        if isinstance(step, ir.Onbuild):
            return replace(self, onbuild=(*self.onbuild, step.instruction))
        return self


def _ns(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and value else None


def config_from_oci(doc: dict[str, Any]) -> ImageConfig:
    """The runtime config of a pulled image (its OCI/Docker image config's `config` object),
    inherited as BuildKit does: Env, WorkingDir, User, Entrypoint, Cmd (reset by a later
    ENTRYPOINT), ExposedPorts, Volumes, Labels, StopSignal, Healthcheck, OnBuild, Shell."""
    c = doc.get("config") or {}
    env = tuple(tuple(e.split("=", 1)) if "=" in e else (e, "")
                for e in c.get("Env") or ())  # fmt: skip
    if not any(k == "PATH" for k, _ in env):
        env = (("PATH", DEFAULT_PATH), *env)  # BuildKit makes sure PATH is set
    hc = c.get("Healthcheck")
    health = None
    if isinstance(hc, dict) and hc.get("Test"):
        health = {"test": list(hc["Test"])}
        for k, ours in (
            ("Interval", "interval"),
            ("Timeout", "timeout"),
            ("StartPeriod", "start_period"),
            ("StartInterval", "start_interval"),
        ):
            if (v := _ns(hc.get(k))) is not None:
                health[ours] = v
        if hc.get("Retries"):
            health["retries"] = int(hc["Retries"])
    cmd = tuple(c.get("Cmd") or ())
    return ImageConfig(
        env=env,  # type: ignore[arg-type]
        workdir=c.get("WorkingDir") or "/",
        user=c.get("User") or "root",
        shell=tuple(c.get("Shell") or ("/bin/sh", "-c")),
        entrypoint=tuple(c.get("Entrypoint") or ()),
        cmd=cmd,
        cmd_from_base=bool(cmd),
        labels=tuple(sorted((c.get("Labels") or {}).items())),
        exposed_ports=tuple(sorted(c.get("ExposedPorts") or {})),
        volumes=tuple(sorted(c.get("Volumes") or {})),
        stopsignal=c.get("StopSignal") or None,
        healthcheck=health,
        onbuild=tuple(c.get("OnBuild") or ()),
    )


def config_to_oci(cfg: dict[str, Any]) -> dict[str, Any]:
    """An image's stored config (`ImageConfig.to_json()`) as the `config` object of an OCI image
    config, the inverse of `config_from_oci` (empty fields left out)."""
    out: dict[str, Any] = {}
    if cfg.get("env"):
        out["Env"] = list(cfg["env"])
    if cfg.get("entrypoint"):
        out["Entrypoint"] = list(cfg["entrypoint"])
    if cfg.get("cmd"):
        out["Cmd"] = list(cfg["cmd"])
    if cfg.get("workdir") and cfg["workdir"] != "/":
        out["WorkingDir"] = cfg["workdir"]
    if cfg.get("user") and cfg["user"] != "root":
        out["User"] = cfg["user"]
    if cfg.get("labels"):
        out["Labels"] = dict(sorted(cfg["labels"].items()))
    if cfg.get("exposed_ports"):
        out["ExposedPorts"] = {p if "/" in p else f"{p}/tcp": {} for p in cfg["exposed_ports"]}
    if cfg.get("volumes"):
        out["Volumes"] = {v: {} for v in cfg["volumes"]}
    if cfg.get("stopsignal"):
        out["StopSignal"] = cfg["stopsignal"]
    if cfg.get("onbuild"):
        out["OnBuild"] = list(cfg["onbuild"])
    if cfg.get("shell") and list(cfg["shell"]) != ["/bin/sh", "-c"]:
        out["Shell"] = list(cfg["shell"])
    if hc := cfg.get("healthcheck"):
        h: dict[str, Any] = {"Test": list(hc.get("test", ["NONE"]))}
        for ours, k in (("interval", "Interval"), ("timeout", "Timeout"),
                        ("start_period", "StartPeriod"), ("start_interval", "StartInterval"),
                        ("retries", "Retries")):  # fmt: skip
            if hc.get(ours) is not None:
                h[k] = hc[ours]
        out["Healthcheck"] = h
    return out
