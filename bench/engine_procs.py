"""CPU time of a local SGLang server's processes (Linux /proc), to charge each route its server CPU.

Wall-clock throughput on a shared machine is noisy; CPU seconds spent per request in the HTTP /
tokenizer-manager process (where the routes run) are not, and they are what a route adds.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
ROLES = ("main", "scheduler", "detokenizer")


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()  # fields from 3 (state) on; comm may hold spaces


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields and int(fields[1]) == pid:  # field 4: ppid
                out.append(int(entry.name))
    return out


@dataclass
class ServerProcesses:
    pids: dict[str, int]  # role -> pid

    @classmethod
    def find(cls, main_pid: int) -> "ServerProcesses | None":
        """The server's main process and its scheduler / detokenizer children (None off Linux)."""
        if not Path(f"/proc/{main_pid}/stat").exists():
            return None
        pids = {"main": main_pid}
        for child in _children(main_pid):
            cmd = _cmdline(child)
            for role in ("scheduler", "detokenizer"):
                if role in cmd and role not in pids:
                    pids[role] = child
        return cls(pids)

    def cpu_seconds(self) -> dict[str, float]:
        out = {}
        for role, pid in self.pids.items():
            fields = _stat(pid)
            if fields:
                out[role] = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
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
