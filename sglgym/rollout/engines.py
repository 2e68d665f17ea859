"""Which engine serves a rollout: every turn of a rollout goes to the same engine, so that engine's radix
cache already holds the conversation's prefix when the next turn arrives.

Two ways to scale out over SGLang data-parallel replicas:
  * a list of engine URLs: the pool pins each rollout to the replica with the fewest rollouts in flight;
  * one `sglang-router` URL (SGLang's load balancer): every request of a rollout carries the same
    `X-SMG-Routing-Key`, which the router's `manual` policy maps to one worker and keeps there.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass, field

ROUTING_KEY_HEADER = "X-SMG-Routing-Key"


@dataclass
class EnginePool:
    urls: list[str]
    api_key: str | None = None
    router: bool = False            # True: urls[0] is an sglang-router; pin with the routing key header
    model: str = "default"
    in_flight: dict[str, int] = field(default_factory=dict)
    assigned: dict[str, int] = field(default_factory=dict)   # rollouts started per URL (metrics)

    def __post_init__(self):
        if not self.urls:
            raise ValueError("at least one engine URL is required")
        self.urls = [u.rstrip("/").removesuffix("/v1") for u in self.urls]
        if self.router and len(self.urls) != 1:
            raise ValueError("router mode takes exactly one URL (the router's)")
        for u in self.urls:
            self.in_flight.setdefault(u, 0)
            self.assigned.setdefault(u, 0)
        self._rr = itertools.count()

    def acquire(self) -> str:
        """The engine for a new rollout: least loaded, ties broken round-robin."""
        low = min(self.in_flight.values())
        candidates = [u for u in self.urls if self.in_flight[u] == low]
        url = candidates[next(self._rr) % len(candidates)]
        self.in_flight[url] += 1
        self.assigned[url] += 1
        return url

    def release(self, url: str) -> None:
        self.in_flight[url] -= 1

    def headers(self, rollout_key: str) -> dict:
        h = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        if self.router:
            h[ROUTING_KEY_HEADER] = rollout_key
        return h


def router_command(worker_urls: list[str], port: int, host: str = "127.0.0.1",
                   api_key: str | None = None) -> list[str]:
    """`sglang-router` in front of the workers with the sticky `manual` policy (routing key -> worker)."""
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *worker_urls,
           "--host", host, "--port", str(port), "--policy", "manual", "--log-level", "warn"]
    if api_key:
        cmd += ["--api-key", api_key]
    return cmd
