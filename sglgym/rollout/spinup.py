"""Start environment servers as subprocesses, wait for health, stop them on exit (Ctrl-C included).

Each server gets its own process group, so stopping it kills whatever it spawned as well, by PID; the
children also get PR_SET_PDEATHSIG so that even a SIGKILL of this process leaves nothing behind.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from .config import EnvConfig

LOG_DIR = Path(os.environ.get("SGLGYM_ROLLOUT_LOG_DIR", "/tmp/sglgym-rollout-logs"))


def free_port(host: str = "127.0.0.1") -> int:
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
                  cwd: str | os.PathLike | None = None) -> ServerProcess:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"{name}-{os.getpid()}-{int(time.time() * 1000) % 10**8}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env, cwd=cwd, preexec_fn=_die_with_parent)
    server = ServerProcess(name, url, proc, log_path)
    _LIVE.add(server)
    return server


def wait_healthy(server: ServerProcess, timeout_s: float, path: str = "/health",
                 headers: dict | None = None) -> None:
    """Poll until GET url+path answers 200; raise (after stopping it) if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if not server.alive():
            stop_process(server)
            raise RuntimeError(f"{server.name} exited with code {server.process.returncode} before it was "
                               f"healthy; log {server.log_path}:\n{server.log_tail()}")
        try:
            if httpx.get(server.url + path, headers=headers, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop_process(server)
            raise TimeoutError(f"{server.name} not healthy at {server.url}{path} after {timeout_s:.0f}s; "
                               f"log {server.log_path}:\n{server.log_tail()}")
        time.sleep(0.25)


def stop_process(server: ServerProcess, grace_s: float = 10.0) -> None:
    """SIGTERM the server's process group, then SIGKILL what is left; always reaps the child."""
    pid = server.process.pid
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        server.process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(pid, signal.SIGKILL)  # stragglers in the group (a server's own children)
    except ProcessLookupError:
        pass
    try:
        server.process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    _LIVE.discard(server)


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


@dataclass
class Env:
    """A running (or external) environment: its URL, config, and dataset rows."""
    config: EnvConfig
    url: str
    server: ServerProcess | None = None
    engine_urls: list[str] = field(default_factory=list)   # nemo_gym envs: the engines their model server calls
    _impl: object = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def tools(self) -> list[dict]:
        impl = self.impl
        return [spec for spec, _ in impl.tools().values()] if impl else []

    @property
    def impl(self):
        """The env class instance in this process (built-in envs): dataset generation and tool specs."""
        if self._impl is None and self.config.type == "resources_server" and self.config.entrypoint:
            from .envs.base import load_env_class
            self._impl = load_env_class(self.config.entrypoint)(**self.config.params)
        return self._impl

    def dataset(self, n: int, seed: int | None = None, split: str = "train") -> list[dict]:
        """n NeMo Gym rows for this env: from the configured JSONL (cycled; `<split>_jsonl`, e.g. test_jsonl,
        when the config names one for this split) or the seeded generator."""
        ds = self.config.dataset
        seed = ds.get("seed", 0) if seed is None else seed
        jsonl = ds.get(f"{split}_jsonl") or ds.get("jsonl")
        if jsonl:
            rows = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
            if not rows:
                raise ValueError(f"{jsonl}: no rows")
            out = [dict(rows[i % len(rows)]) for i in range(n)]
        elif self.impl is not None:
            out = self.impl.dataset(n, seed=seed, split=split)
        else:
            raise ValueError(f"env {self.name!r} has no dataset: set dataset.jsonl in its config")
        for row in out:  # rows name the env that runs them (NeMo Gym's agent_ref): this env
            row["agent_ref"] = {"type": "responses_api_agents", "name": self.name}
        return out

    def write_dataset(self, path: str | os.PathLike, n: int, seed: int | None = None,
                      split: str = "train") -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in self.dataset(n, seed, split)))
        return path


def env_server_command(cfg: EnvConfig, port: int) -> list[str]:
    return [sys.executable, "-m", "sglgym.rollout.envs.serve", "--entrypoint", cfg.entrypoint,
            "--host", cfg.host, "--port", str(port), "--params", json.dumps(cfg.params)]


class EnvFleet:
    """The chosen environments, started together and stopped together (a context manager).

        with EnvFleet(select(load_config(path, overrides), ["guess"])) as fleet:
            rows = fleet["guess"].dataset(16)
    """

    def __init__(self, configs: dict[str, EnvConfig], engine_urls: str | list[str] | None = None,
                 api_key: str | None = None):
        self.configs = configs
        # for nemo_gym envs: the engine replicas their model server spreads rollouts over, and their key
        self.engine_urls = [engine_urls] if isinstance(engine_urls, str) else list(engine_urls or [])
        self.api_key = api_key
        self.envs: dict[str, Env] = {}
        self.extra_servers: list = []   # handles of non-uvicorn spin-ups (nemo_gym), stopped with us

    def __getitem__(self, name: str) -> Env:
        return self.envs[name]

    def __iter__(self):
        return iter(self.envs.values())

    def __len__(self) -> int:
        return len(self.envs)

    def start(self) -> "EnvFleet":
        pending: list[tuple[Env, float]] = []
        try:
            for cfg in self.configs.values():
                if cfg.type == "nemo_gym":
                    from .nemo_gym import start_nemo_gym
                    env = start_nemo_gym(cfg, self)
                elif cfg.url:
                    env = Env(cfg, cfg.url.rstrip("/"))
                else:
                    port = cfg.port or free_port(cfg.host)
                    url = f"http://{cfg.host}:{port}"
                    # Start them all first, then wait: servers boot in parallel.
                    env = Env(cfg, url, start_process(f"env-{cfg.name}", env_server_command(cfg, port), url))
                    pending.append((env, cfg.startup_timeout_s))
                self.envs[cfg.name] = env
            for env, timeout in pending:
                wait_healthy(env.server, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for env in self.envs.values():
            if env.server is not None:
                stop_process(env.server)
        for handle in self.extra_servers:
            handle.stop()
        self.extra_servers.clear()

    def pids(self) -> list[int]:
        return [e.server.pid for e in self.envs.values() if e.server is not None]

    def __enter__(self) -> "EnvFleet":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
