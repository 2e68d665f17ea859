"""CPU time of a local SGLang server's processes (psutil), to charge each route its server CPU.

Wall-clock throughput on a shared machine is noisy; CPU seconds spent per request in the HTTP /
tokenizer-manager process (where the routes run) are not, and they are what a route adds.
"""

from __future__ import annotations

import time
from contextlib import suppress
from dataclasses import dataclass

import psutil

ROLES = ("main", "scheduler", "detokenizer")


@dataclass
class ServerProcesses:
    pids: dict[str, int]  # role -> pid

    @classmethod
    def find(cls, main_pid: int) -> "ServerProcesses | None":
        """The server's main process and its scheduler / detokenizer children (None when it is gone)."""
        try:
            children = psutil.Process(main_pid).children()
        except psutil.NoSuchProcess:
            return None
        pids = {"main": main_pid}
        for child in children:
            with suppress(psutil.Error):
                cmd = " ".join(child.cmdline())
                for role in ("scheduler", "detokenizer"):
                    if role in cmd and role not in pids:
                        pids[role] = child.pid
        return cls(pids)

    def cpu_seconds(self) -> dict[str, float]:
        out = {}
        for role, pid in self.pids.items():
            with suppress(psutil.Error):
                t = psutil.Process(pid).cpu_times()
                out[role] = t.user + t.system
        return out


@dataclass
class CpuMeter:
    """CPU seconds used between start() and stop(): server processes (if known) and this client."""
    server: ServerProcesses | None = None

    def start(self) -> None:
        self._server0 = self.server.cpu_seconds() if self.server else {}
        self._client0 = time.process_time()

    def stop(self) -> dict[str, float]:
        used = {"client": time.process_time() - self._client0}
        if self.server:
            now = self.server.cpu_seconds()
            used.update({role: now[role] - self._server0[role] for role in now if role in self._server0})
        return used
