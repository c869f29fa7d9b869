"""Lowering of the instructions that only change the image config: the value rules BuildKit
applies at dispatch time (EXPOSE port specs, STOPSIGNAL names, WORKDIR normalization,
HEALTHCHECK defaults)."""

from __future__ import annotations

import posixpath
import re

from tlimage import ir
from tlimage.frontends.dockerfile import instructions as ins
from tlimage.frontends.dockerfile.lower_base import Problem

# -------------------------------------------------------------------------------- WORKDIR


def normalize_workdir(current: str, requested: str) -> str:
    """BuildKit's `system.NormalizeWorkdir`: a relative path joins the current directory;
    the result is cleaned (`/a/./b/../c/` -> `/a/c`)."""
    if requested == "":
        raise Problem("normalizing workdir: cannot normalize nothing")
    joined = requested if requested.startswith("/") else posixpath.join("/", current, requested)
    clean = posixpath.normpath(joined)
    return "/" + clean.lstrip("/")  # normpath keeps a leading `//`


# --------------------------------------------------------------------------------- EXPOSE

_DIGITS = re.compile(r"[0-9]+\Z")


def _port_number(text: str) -> int:
    """strconv.ParseUint(text, 10, 16)."""
    if not _DIGITS.match(text) or int(text) > 0xFFFF:
        raise ValueError(text)
    return int(text)


def _port_range(text: str) -> tuple[int, int]:
    if text == "":
        raise ValueError("empty string specified for ports")
    if "-" not in text:
        n = _port_number(text)
        return n, n
    parts = text.split("-")
    if len(parts) != 2:
        raise ValueError(f"invalid port range format: {text}")
    start, end = _port_number(parts[0]), _port_number(parts[1])
    if end < start:
        raise ValueError(f"invalid range specified for port: {text}")
    return start, end


def port_spec(raw: str) -> str:
    """One EXPOSE word as `PORT/proto` or `START-END/proto` (BuildKit's `parsePortSpec`:
    `[ip:][hostPort:]containerPort[/proto]`, protocol tcp by default, lower-cased).

    Unlike BuildKit, a range stays one entry instead of one per port: it is how the other front
    ends write it, and it keeps `EXPOSE 1-65535` a short step."""
    parts = raw.split(":")
    container = parts[-1]
    host = parts[-2] if len(parts) >= 2 else ""
    ip = ":".join(parts[:-2])
    port, _, proto = container.partition("/")
    if port == "":
        raise Problem(f"no port specified: {container}<empty>", raw)
    proto = proto.lower()
    if proto == "":
        proto = "tcp"
    elif proto not in ("tcp", "udp", "sctp"):
        raise Problem(f"invalid proto: {proto}", raw)
    if ip.startswith("["):
        if not ip.endswith("]"):
            raise Problem(f"invalid IP address {ip}", raw)
        ip = ip[1:-1]
    if ip and not _is_ip(ip):
        raise Problem(f"invalid IP address: {ip}", raw)
    try:
        start, end = _port_range(port)
    except ValueError:
        raise Problem(f"invalid containerPort: {port}", raw) from None
    if host:
        try:
            hstart, hend = _port_range(host)
        except ValueError:
            raise Problem(f"invalid hostPort: {host}", raw) from None
        if end - start != hend - hstart and end != start:
            raise Problem(
                f"invalid ranges specified for container and host Ports: {port} and {host}", raw
            )
    rng = str(start) if start == end else f"{start}-{end}"
    return f"{rng}/{proto}"


def _is_ip(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def lower_expose(cmd: ins.ExposeCommand) -> ir.Expose:
    """`cmd` is expanded already (one word may have become several)."""
    ports = dict.fromkeys(port_spec(p) for p in cmd.ports)
    return ir.Expose(ports=tuple(ports))


# ----------------------------------------------------------------------------- STOPSIGNAL

# moby/sys/signal's SignalMap for Linux (names without the SIG prefix).
_SIGNALS = frozenset(
    "ABRT ALRM BUS CHLD CLD CONT FPE HUP ILL INT IO IOT KILL PIPE POLL PROF PWR QUIT SEGV "
    "STKFLT STOP SYS TERM TRAP TSTP TTIN TTOU URG USR1 USR2 VTALRM WINCH XCPU XFSZ RTMIN "
    "RTMAX".split()
    + [f"RTMIN+{i}" for i in range(1, 16)]
    + [f"RTMAX-{i}" for i in range(1, 15)]
)
_ATOI = re.compile(r"[+-]?[0-9]+\Z")


def lower_stopsignal(cmd: ins.StopSignalCommand) -> ir.StopSignal:
    """The signal as written (after expansion); checked as `signal.ParseSignal` does: a
    non-zero number, or a name with or without `SIG`, in any case."""
    sig = cmd.signal
    if _ATOI.match(sig):
        ok = int(sig) != 0
    else:
        name = sig.upper()
        ok = (name[3:] if name.startswith("SIG") else name) in _SIGNALS
    if not ok:
        raise Problem(f"invalid signal: {sig}", sig or None)
    return ir.StopSignal(signal=sig)


# ---------------------------------------------------------------------------- HEALTHCHECK


def lower_healthcheck(cmd: ins.HealthcheckCommand) -> ir.Healthcheck:
    """0 (not given) becomes None: the runtime's default applies."""

    def opt(v: int) -> int | None:
        return v or None

    return ir.Healthcheck(
        test=cmd.test,
        interval=opt(cmd.interval),
        timeout=opt(cmd.timeout),
        start_period=opt(cmd.start_period),
        start_interval=opt(cmd.start_interval),
        retries=opt(cmd.retries),
    )
