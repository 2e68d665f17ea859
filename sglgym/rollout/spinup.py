"""Start environment servers as subprocesses, wait for health, stop them on exit (Ctrl-C included).

The process handling (own process group, PR_SET_PDEATHSIG, stopping the whole tree) is sglgym.procs;
this module picks which servers an env config needs and starts them together (EnvFleet).
"""

from __future__ import annotations

import json
import sys

from sglgym.procs import LOG_DIR, ServerProcess, free_port, start_process, stop_process, wait_healthy

from .config import EnvConfig
from .env import Env
from .nemo_gym import start_nemo_gym

# Other modules (and scripts) import these names from here.
__all__ = ["Env", "EnvFleet", "LOG_DIR", "ServerProcess", "env_server_command", "free_port", "start_process",
           "stop_process", "wait_healthy"]


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

    def restart_dead(self) -> list[str]:
        """Restart every env server of ours that died (same port: clients keep its URL), and every NeMo Gym
        run with a server down (all of its `gym env start`, on the same ports); their names."""
        restarted = []
        for run in self.extra_servers:
            if not run.healthy():
                run.restart()
                restarted.append(run.name)
        for name, env in self.envs.items():
            if env.server is None or env.server.alive():
                continue  # external, NeMo Gym's (above), or alive
            stop_process(env.server, grace_s=1)
            port = int(env.url.rsplit(":", 1)[1])
            env.server = start_process(f"env-{name}", env_server_command(env.config, port), env.url)
            wait_healthy(env.server, env.config.startup_timeout_s)
            restarted.append(name)
        return restarted

    def pids(self) -> list[int]:
        return [e.server.pid for e in self.envs.values() if e.server is not None]

    def __enter__(self) -> "EnvFleet":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
