"""The supervisor of one microVM sandbox: `python -m tlimage.sandbox.qemu.shim SPEC.json`.

One shim per VM, started detached (`setsid -f`) by tlimage/runtime/microvm.py; QEMU is its
child and dies with it (PR_SET_PDEATHSIG). The shim:

- boots the VM (or restores it from a suspend file with `-incoming defer`, connecting the
  agent's channel before the guest runs, so the guest never sees its host leave), mounts the
  sandbox root and starts the entrypoint;
- reports `ready {"shim": pid, "qemu": pid}` on the socket `sock_fd` and waits for `go` (a
  creator that dies first never sends it, and the shim ends the VM);
- holds the agent's channel for the VM's whole life and serves any number of clients at once
  on `<run dir>/shim.sock`: each connection is one agent session (protocol version 4), its
  frames forwarded with the session's id and the agent's frames of that session sent back
  (with 0, so a client speaks as if it had the channel to itself). A client that disconnects
  ends its session (END): the agent cleans up after it — a running EXEC is killed, a half-sent
  PUT is ended, a FREEZE is undone, the rest of a reply is discarded;
- starts QEMU, when the sandbox has network, in a network namespace of its own attached through
  sandbox/network.py (slirp4netns + nft: the guest reaches neither the host's loopback nor its
  addresses nor private ranges), and holds the helper, which ends with the shim;
- ends the VM on SIGTERM or when the deadline in `deadline_file` passes (asking the agent to
  shut the guest down first, for at most `stop_grace` seconds), and writes
  `exit_file` (reason, exit code) when the VM ends for any reason other than a suspend (the
  suspending client writes `suspended` in the sandbox folder before it quits QEMU).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tlimage._fs import write_atomic
from tlimage.sandbox.network import NetHandle, NetworkPolicy
from tlimage.sandbox.qemu import protocol as P
from tlimage.sandbox.qemu.process import start_qemu
from tlimage.sandbox.qemu.qmp import QMP, wait_migration

T = P.FrameType
ENTRY_EXIT = re.compile(rb"tl-agent: entrypoint exited with status (\d+)")


class Agent:
    """The VM end: frames over QEMU's virtio-serial socket."""

    def __init__(self, path: str, deadline: float, proc: subprocess.Popen) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        while True:
            if proc.poll() is not None:
                raise RuntimeError("QEMU exited during start-up")
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise RuntimeError("QEMU did not open its channel socket") from None
                time.sleep(0.005)
        self.buf = b""

    def send(self, frame: P.Frame) -> None:
        self.sock.sendall(P.encode_frame(frame))

    def feed(self) -> list[P.Frame]:
        data = self.sock.recv(1 << 20)
        if not data:
            raise EOFError("the guest channel closed")
        frames, self.buf = P.decode_frames(self.buf + data)
        return frames

    def recv(self, deadline: float) -> P.Frame:
        while True:
            if len(self.buf) >= P.HEADER.size:
                t, length, session = P.decode_header_session(self.buf[: P.HEADER.size])
                end = P.HEADER.size + length
                if len(self.buf) >= end:
                    frame = P.Frame(t, self.buf[P.HEADER.size : end], session)
                    self.buf = self.buf[end:]
                    return frame
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 20)
            finally:
                self.sock.settimeout(None)
            if not data:
                raise EOFError("the guest channel closed")
            self.buf += data

    def request(self, frame: P.Frame, deadline: float) -> P.Frame:
        """A request of the shim's own session (0); late frames of other sessions (of a host
        before a restore) are dropped."""
        self.send(frame)
        reply = self.recv(deadline)
        while reply.session != 0:
            reply = self.recv(deadline)
        if reply.type is T.ERROR:
            raise RuntimeError(P.decode_error(reply))
        return reply


class Mux:
    """Which client each agent session belongs to. A client gets a session of its own when it
    connects (1..65535, taken in turn so that an id comes back only long after its END, when no
    late frame of the session before can still be on its way) and gives it back with END when it
    leaves. Pure bookkeeping, so it is tested without a VM."""

    def __init__(self) -> None:
        self.next = 1
        self.session: dict[object, int] = {}  # client -> session
        self.client: dict[int, object] = {}  # session -> client

    def open(self, client: object) -> int:
        for _ in range(P.MAX_SESSION):
            sid, self.next = self.next, self.next % P.MAX_SESSION + 1
            if sid not in self.client:
                self.session[client], self.client[sid] = sid, client
                return sid
        raise RuntimeError("no free agent session")

    def to_agent(self, client: object, f: P.Frame) -> P.Frame:
        return P.with_session(f, self.session[client])

    def from_agent(self, f: P.Frame) -> tuple[object | None, P.Frame]:
        """(the client to deliver it to, or None: its session is over), the frame as the client
        sees it."""
        return self.client.get(f.session) if f.session else None, P.with_session(f, 0)

    def close(self, client: object) -> P.Frame:
        sid = self.session.pop(client)
        del self.client[sid]
        return P.with_session(P.encode_end(), sid)


class Shim:
    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.run = Path(spec["run_dir"])
        self.dir = Path(spec["dir"])
        self.proc: subprocess.Popen | None = None
        self.agent: Agent | None = None
        self.cbufs: dict[socket.socket, bytes] = {}
        self.secret_env: list[str] = []  # the entrypoint's secrets, from the creator's socket
        self.mux = Mux()
        self.net: NetHandle | None = None

    # -- start ----------------------------------------------------------------------------

    def start(self) -> None:
        spec = self.spec
        argv = list(spec["qemu_argv"])
        if spec.get("incoming"):
            argv += ["-incoming", "defer"]
        policy = spec.get("network_policy")
        self.proc, self.net = start_qemu(
            argv, self.dir / "qemu.log", network_dir=self.run if spec.get("network") else None,
            policy=NetworkPolicy.from_json(policy) if policy else None)  # fmt: skip
        deadline = time.monotonic() + spec["boot_timeout"]
        self.agent = Agent(str(self.run / "ctl.sock"), deadline, self.proc)
        if spec.get("incoming"):
            self._restore(spec["incoming"], deadline)
            hello = self.agent.request(P.encode_attach(time.time_ns()), deadline)
            P.decode_hello(hello)
            return
        try:
            P.decode_hello(self.agent.recv(deadline))
        except TimeoutError:
            raise RuntimeError(f"the guest agent did not answer within "
                               f"{spec['boot_timeout']:g} s") from None  # fmt: skip
        setup = spec["setup"]
        m = setup["mount"]
        self.agent.request(
            P.encode_mount(P.MountRequest(tuple(m["lowers"]), m["upper"], m["work"], m["target"])),
            deadline,
        )
        sb = setup["sandbox"]
        self.agent.request(
            P.encode_sandbox(P.SandboxMsg(sb["root"], sb["network"], sb["hostname"])), deadline
        )
        ep = setup.get("entrypoint")
        if ep:
            env = _merge_env(ep["env"], self.secret_env)
            self.agent.request(
                P.encode_spawn(P.ExecMsg(tuple(ep["argv"]), tuple(env), ep["user"], ep["workdir"])),
                deadline,
            )

    def _restore(self, state: str, deadline: float) -> None:
        qmp = QMP(str(self.run / "qmp.sock"), deadline)
        try:
            qmp.command(
                "migrate-set-capabilities",
                capabilities=[{"capability": "x-ignore-shared", "state": True}],
            )
            qmp.command("migrate-incoming", uri=f"exec:cat {_quote(state)}")
            wait_migration(qmp, deadline)
            qmp.command("cont")
        finally:
            qmp.close()

    # -- serving --------------------------------------------------------------------------

    def listen(self) -> socket.socket:
        """The clients' socket, bound before the shim reports ready."""
        listener = socket.socket(socket.AF_UNIX)
        path = self.run / "shim.sock"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        listener.bind(str(path))
        listener.listen(16)
        return listener

    def serve(self, listener: socket.socket) -> None:
        assert self.proc is not None and self.agent is not None
        sel = selectors.DefaultSelector()
        sel.register(listener, selectors.EVENT_READ, "accept")
        sel.register(self.agent.sock, selectors.EVENT_READ, "agent")
        pidfd = os.pidfd_open(self.proc.pid)
        sel.register(pidfd, selectors.EVENT_READ, "qemu")
        sig_r, sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(sig_w)
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, lambda *_: None)
        sel.register(sig_r, selectors.EVENT_READ, "signal")
        while True:
            deadline = self._deadline()
            if deadline is not None and time.time() >= deadline:
                self.end("timeout")
            wait = 3600.0 if deadline is None else min(3600.0, max(0.0, deadline - time.time()))
            for key, _ in sel.select(wait):
                what = key.data
                if what == "signal":
                    os.read(sig_r, 64)
                    self.end("terminated")
                elif what == "qemu":
                    self.vm_exited()
                elif what == "accept":
                    client, _ = listener.accept()
                    self.mux.open(client)
                    self.cbufs[client] = b""
                    sel.register(client, selectors.EVENT_READ, "client")
                elif what == "client":
                    self.from_client(sel, key.fileobj)  # type: ignore[arg-type]
                elif what == "agent":
                    try:
                        frames = self.agent.feed()
                    except (EOFError, OSError):
                        self.vm_exited()
                        continue
                    for f in frames:
                        self.from_agent(sel, f)

    def from_client(self, sel: selectors.BaseSelector, client: socket.socket) -> None:
        assert self.agent is not None
        try:
            data = client.recv(1 << 20)
        except OSError:
            data = b""
        if not data:
            self.drop_client(sel, client)
            return
        try:
            frames, self.cbufs[client] = P.decode_frames(self.cbufs[client] + data)
        except P.ProtocolError:
            self.drop_client(sel, client)
            return
        for f in frames:
            if not self.to_agent(self.mux.to_agent(client, f)):
                return

    def from_agent(self, sel: selectors.BaseSelector, f: P.Frame) -> None:
        client, frame = self.mux.from_agent(f)
        if client is None:
            return  # a late frame of a session that ended
        try:
            client.sendall(P.encode_frame(frame))  # type: ignore[attr-defined]
        except OSError:
            pass  # the client is gone; its EOF arrives next

    def drop_client(self, sel: selectors.BaseSelector, client: socket.socket) -> None:
        """The client left: its session ends, and the agent finishes what it started."""
        assert self.agent is not None
        sel.unregister(client)
        client.close()
        del self.cbufs[client]
        self.to_agent(self.mux.close(client))

    def to_agent(self, frame: P.Frame) -> bool:
        """Sends a client's frame; False when the channel is gone. QEMU has then exited or is
        exiting (a suspend quits it while its client hangs up): the channel's EOF and QEMU's
        exit come next and end the shim through `vm_exited`, which closes the network helper
        first. Raising here instead killed the shim with a traceback and left the helper to
        notice its exit pipe on its own, after the caller saw the shim gone."""
        assert self.agent is not None
        try:
            self.agent.send(frame)
        except OSError:
            return False
        return True

    # -- the end --------------------------------------------------------------------------

    def _deadline(self) -> float | None:
        try:
            text = Path(self.spec["deadline_file"]).read_text().strip()
            return float(text) if text else None
        except (OSError, ValueError):
            return None

    def vm_exited(self) -> None:
        assert self.proc is not None
        self.proc.wait()
        if (self.dir / "suspended").exists():
            self.exit(None)
        code = None
        with contextlib.suppress(OSError):
            tail = (self.dir / "console.log").read_bytes()[-4096:]
            found = ENTRY_EXIT.findall(tail)
            if found:
                code = int(found[-1])
        if code is not None:
            self.exit({"reason": "entrypoint exited", "exit_code": code})
        self.exit(
            {"reason": f"the VM exited (QEMU status {self.proc.returncode})", "exit_code": None}
        )

    def end(self, reason: str) -> None:
        self.shut_down()
        self.kill_vm()
        self.exit({"reason": reason, "exit_code": None})

    def shut_down(self) -> None:
        """Asks the agent to end the VM (SHUTDOWN on session 0, which only the shim uses, so
        it is served whatever the clients' sessions are doing: the guest syncs its writes to
        the scratch disk first; under systemd, the units are stopped) and waits up to
        `stop_grace` seconds for QEMU to exit. A guest that does not end in time is killed by
        the caller."""
        grace = float(self.spec.get("stop_grace") or 0)
        if grace <= 0 or self.agent is None or self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.agent.send(P.encode_shutdown())
            self.proc.wait(grace)
        except (OSError, subprocess.TimeoutExpired):
            pass

    def kill_vm(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def exit(self, info: dict | None) -> None:
        if info is not None:
            with contextlib.suppress(OSError):  # the sandbox folder may be gone (a stray VM)
                write_atomic(self.spec["exit_file"], json.dumps({**info, "at": time.time()}))
        self.kill_vm()
        if self.net is not None:
            self.net.close()
        if not self.dir.is_dir():  # no record is left to clean up after us: the run folder too
            shutil.rmtree(self.run, ignore_errors=True)
        for name in ("shim.sock", "ctl.sock", "qmp.sock", "resolv.conf"):
            with contextlib.suppress(OSError):
                (self.run / name).unlink()
        os._exit(0)


def _merge_env(env: list[str], more: list[str]) -> list[str]:
    merged: dict[str, str] = {}
    for item in [*env, *more]:
        k, _, v = item.partition("=")
        merged[k] = v
    return [f"{k}={v}" for k, v in merged.items()]


def _quote(path: str) -> str:
    import shlex

    return shlex.quote(path)


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    sock = socket.socket(fileno=spec["sock_fd"])
    shim = Shim(spec)
    try:
        if spec.get("secret_env_follows"):
            sock.settimeout(60)
            shim.secret_env = json.loads(sock.recv(1 << 20))
        shim.start()
        listener = shim.listen()
    except Exception as e:  # noqa: BLE001 - every failure is reported to the creator
        shim.kill_vm()
        tail = ""
        with contextlib.suppress(OSError):
            lines = []
            for name in ("qemu.log", "console.log"):
                lines += (shim.dir / name).read_text(errors="replace").strip().splitlines()[-8:]
            tail = "\n".join("  | " + line for line in lines)
        sock.sendall(f"error: {e}\n{tail}".encode())
        os._exit(1)
    assert shim.proc is not None
    sock.sendall(("ready " + json.dumps({"shim": os.getpid(), "qemu": shim.proc.pid})).encode())
    sock.settimeout(60)
    try:
        go = sock.recv(16)
    except OSError:
        go = b""
    sock.close()
    if go != b"go":
        shim.end("the host did not confirm the start")
    try:
        shim.serve(listener)
    except Exception as e:  # noqa: BLE001 - the VM and the network helper end with the shim
        import traceback

        traceback.print_exc()  # to shim.log
        suspended = (shim.dir / "suspended").exists()
        shim.exit(None if suspended else {"reason": f"the sandbox's supervisor failed: {e}",
                                          "exit_code": None})  # fmt: skip


if __name__ == "__main__":
    main()
