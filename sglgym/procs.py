"""Process supervision: start servers as subprocesses, wait for health, stop their whole tree (Ctrl-C included).

Each server gets its own process group, so stopping it kills whatever it spawned as well, by PID; the
children also get PR_SET_PDEATHSIG so that even a SIGKILL of this process leaves nothing behind.
A process group is not the whole story: a server's children may call setsid (Ray daemons do) and leave the
group, so stopping also signals every descendant psutil finds under the server, collected before the
server dies (after that they are reparented and no longer found under it).

A low-level module: it imports nothing from sglgym.rollout or sglgym.trainer.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

LOG_DIR = Path(os.environ.get("SGLGYM_ROLLOUT_LOG_DIR", "/tmp/sglgym-rollout-logs"))


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now (another process may take it before ours binds: keep the gap short)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask the kernel to SIGTERM it when its parent dies.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass


@dataclass
class ServerProcess:
    name: str
    url: str
    process: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def start_process(name: str, cmd: list[str], url: str, env: dict | None = None,
                  cwd: str | os.PathLike | None = None, log_dir: Path | None = None) -> ServerProcess:
    """Start `cmd` in its own session (its own process group), stdout+stderr to a log file in `log_dir`
    (default LOG_DIR); it is stopped at exit unless stopped before."""
    log_dir = LOG_DIR if log_dir is None else Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}-{os.getpid()}-{int(time.time() * 1000) % 10**8}.log"
    # PR_SET_PDEATHSIG fires when the *thread* that forked exits, not the process: a server started from a
    # worker thread would be SIGTERMed as soon as that thread ends. There, only atexit/teardown stops it.
    die_with_parent = _die_with_parent if threading.current_thread() is threading.main_thread() else None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env, cwd=cwd, preexec_fn=die_with_parent)
    server = ServerProcess(name, url, proc, log_path)
    _LIVE.add(server)
    return server


def answers(url: str, headers: dict | None = None, timeout_s: float = 2.0) -> bool:
    """GET `url` answers 200 within `timeout_s`."""
    try:
        return httpx.get(url, headers=headers, timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def wait_healthy(server: ServerProcess, timeout_s: float, path: str = "/health",
                 headers: dict | None = None) -> None:
    """Poll until GET url+path answers 200; raise (after stopping it) if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if not server.alive():
            stop_process(server)
            raise RuntimeError(f"{server.name} exited with code {server.process.returncode} before it was "
                               f"healthy; log {server.log_path}:\n{server.log_tail()}")
        if answers(server.url + path, headers):
            return
        if time.monotonic() > deadline:
            stop_process(server)
            raise TimeoutError(f"{server.name} not healthy at {server.url}{path} after {timeout_s:.0f}s; "
                               f"log {server.log_path}:\n{server.log_tail()}")
        time.sleep(0.25)


# --- the process tree --------------------------------------------------------------------------------
def _running(p: psutil.Process) -> bool:
    """Alive and not a zombie (a zombie has exited: it only waits for its parent to reap it)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def pid_alive(pid: int) -> bool:
    """True if the process exists and is not a zombie."""
    try:
        return _running(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


def _handles(pids: Iterable[int]) -> list[psutil.Process]:
    """psutil handles of those still there; a handle refuses to signal a PID that was reused since."""
    out = []
    for pid in pids:
        with suppress(psutil.NoSuchProcess):
            out.append(psutil.Process(pid))
    return out


def _with_children(procs: Iterable[psutil.Process]) -> set[psutil.Process]:
    out = set(procs)
    for p in list(out):
        with suppress(psutil.NoSuchProcess):
            out.update(p.children(recursive=True))
    return out


def descendants(pid: int) -> set[int]:
    """PIDs of the process's children, their children, ... (empty when it is gone)."""
    return {p.pid for p in _with_children(_handles([pid]))} - {pid}


def wait_gone(procs: Iterable[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait until none of `procs` runs (zombies count as gone); returns those still running."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [p for p in procs if _running(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def _leads_group(pid: int) -> bool:
    # killpg only on a group the process leads, and never on ours.
    try:
        return os.getpgid(pid) == pid != os.getpgrp()
    except ProcessLookupError:
        return False


def _signal(pgid: int | None, procs: Iterable[psutil.Process], sig: int) -> None:
    if pgid is not None:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
    for p in procs:
        with suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            p.send_signal(sig)


def stop_tree(target: int | ServerProcess, grace_s: float = 10.0, also: Iterable[int] = ()) -> None:
    """SIGTERM the target's process group and every descendant (some may have left the group), wait up to
    `grace_s` for them to exit, SIGKILL what is left, and reap. `also`: PIDs seen in the tree earlier
    (descendants whose parent has exited since are no longer found under the target)."""
    popen = target.process if isinstance(target, ServerProcess) else None
    root = target.pid if isinstance(target, ServerProcess) else target
    # start_process gave a ServerProcess its own group; it may be gone already, with members left in it
    pgid = root if popen is not None or _leads_group(root) else None
    tree = _with_children(_handles([root, *also]))
    tree = {p for p in tree if p.pid != os.getpid()}
    _signal(pgid, tree, signal.SIGTERM)
    # SIGKILL the group even when the tree is gone: members orphaned before we looked are only there
    left = _with_children(wait_gone(tree, grace_s))   # with whatever the survivors spawned meanwhile
    _signal(pgid, left, signal.SIGKILL)
    wait_gone(left, 5)
    _reap(popen, root)
    if isinstance(target, ServerProcess):
        _LIVE.discard(target)


def _reap(popen: subprocess.Popen | None, root: int) -> None:
    # An exited child stays a zombie until waited for; of the tree only the root can be our child.
    if popen is not None:
        with suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=5)
        return
    for p in _handles([root]):
        with suppress(psutil.Error, ChildProcessError):
            if p.ppid() == os.getpid():
                p.wait(timeout=5)


def stop_process(server: ServerProcess, grace_s: float = 10.0) -> None:
    """SIGTERM the server's process group and descendants, then SIGKILL what is left; always reaps it."""
    stop_tree(server, grace_s)


class _LiveSet:
    """Every server this process started and has not stopped; stopped at exit and on SIGTERM."""

    def __init__(self):
        self._servers: list[ServerProcess] = []
        self._lock = threading.Lock()
        self._installed = False

    def add(self, s: ServerProcess) -> None:
        with self._lock:
            self._servers.append(s)
            if not self._installed:
                self._installed = True
                atexit.register(self.stop_all)
                if threading.current_thread() is threading.main_thread() \
                        and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
                    # SIGTERM becomes SystemExit so `finally` blocks and atexit run (Ctrl-C already
                    # raises KeyboardInterrupt).
                    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    def discard(self, s: ServerProcess) -> None:
        with self._lock:
            if s in self._servers:
                self._servers.remove(s)

    def stop_all(self) -> None:
        for s in list(self._servers):
            stop_process(s, grace_s=3)


_LIVE = _LiveSet()
