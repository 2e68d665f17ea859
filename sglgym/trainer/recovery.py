"""Rank 0's recovery of what a step's rollouts need: engines and environment servers.

After each step's collection, when rollouts failed: an env server of ours that died is restarted on its
port; an engine that `sglgym train` started and that died is restarted on its port with its key (the
caller then refits the current weights into it and the step's rollouts are collected again); an external
engine (`engine_urls`) that stops answering is waited for up to `engine_wait_s`, then the run stops with
`EngineLost` (after a checkpoint). Counted in metrics as engine_restarts, env_restarts.
"""

from __future__ import annotations

import time


class EngineLost(RuntimeError):
    pass


def _healthy(url: str, api_key: str | None) -> bool:
    from sglgym.procs import answers

    return answers(f"{url}/health", {"Authorization": f"Bearer {api_key}"} if api_key else None, timeout_s=5.0)


class Recovery:
    def __init__(self, urls: list[str], api_key: str | None, fleet, engine_server=None, serve_args: str = "",
                 engine_start_timeout_s: float = 600.0, engine_wait_s: float = 120.0):
        """`engine_server`: the ServerProcess of the engine this run started (restartable), else None."""
        self.urls, self.api_key, self.fleet = urls, api_key, fleet
        self.engine_server, self.serve_args = engine_server, serve_args
        self.start_timeout_s, self.wait_s = engine_start_timeout_s, engine_wait_s
        self.engine_restarts = self.env_restarts = 0

    def after_failures(self) -> bool:
        """Restart what died; True when an engine was restarted (its weights must be refit)."""
        restarted_envs = self.fleet.restart_dead() if self.fleet is not None else []
        self.env_restarts += len(restarted_envs)
        for name in restarted_envs:
            print(f"[train] env server {name!r} died: restarted", flush=True)
        if self.engine_server is not None:
            return self._restart_own_engine()
        self._wait_for_external()
        return False

    def _restart_own_engine(self) -> bool:
        from sglgym.procs import stop_process
        from sglgym.rollout.engines import start_engine

        if self.engine_server.alive() and _healthy(self.urls[0], self.api_key):
            return False
        stop_process(self.engine_server, grace_s=5)   # what is left of its tree
        port = int(self.urls[0].rsplit(":", 1)[1])
        print(f"[train] engine {self.urls[0]} died: restarting it", flush=True)
        self.engine_server, _, _ = start_engine(self.serve_args, self.start_timeout_s, port=port, key=self.api_key)
        self.engine_restarts += 1
        return True

    def _wait_for_external(self) -> None:
        deadline = time.monotonic() + self.wait_s
        down = [u for u in self.urls if not _healthy(u, self.api_key)]
        while down and time.monotonic() < deadline:
            time.sleep(2)
            down = [u for u in down if not _healthy(u, self.api_key)]
        if down:
            raise EngineLost(f"engine(s) {down} did not answer /health for {self.wait_s:.0f}s; they are not ours to "
                             f"restart: bring them back and resume with `sglgym train --resume OUT`")

    def metrics(self) -> dict:
        return {"engine_restarts": self.engine_restarts, "env_restarts": self.env_restarts}
