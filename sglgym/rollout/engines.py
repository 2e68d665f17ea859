"""Which engine serves a rollout: every turn of a rollout goes to the same engine, so that engine's radix
cache already holds the conversation's prefix when the next turn arrives.

Scale-out over SGLang data-parallel replicas:
  * a list of engine URLs: each rollout is pinned to the replica with the fewest rollouts in flight;
  * one `sglang-router` URL (SGLang's load balancer): the pool reads the router's worker registry
    (`GET /workers`, healthy workers only) and pins rollouts to those workers the same way.
Why not send the turns through the router: sglang-router 0.3.2 parses chat requests into its own typed
structs and forwards them re-serialised, which drops the `prompt_token_ids` / `generation_token_ids` /
`generation_log_probs` carried on assistant messages. Turn 2 would then be re-templated and the prompt
would no longer extend the ids the model produced (checked against the tiny model: not contiguous).
The router stays the source of truth for which replicas exist and are healthy.
"""

from __future__ import annotations

import itertools
import sys
import time
from dataclasses import dataclass, field

import httpx

from sglgym.procs import free_port, start_process, wait_healthy


@dataclass
class EnginePool:
    urls: list[str]
    api_key: str | None = None
    model: str = "default"
    router_url: str | None = None        # set when the workers came from an sglang-router
    in_flight: dict[str, int] = field(default_factory=dict)
    assigned: dict[str, int] = field(default_factory=dict)   # rollouts started per URL (metrics)

    def __post_init__(self):
        if not self.urls:
            raise ValueError("at least one engine URL is required")
        self.urls = [u.rstrip("/").removesuffix("/v1") for u in self.urls]
        for u in self.urls:
            self.in_flight.setdefault(u, 0)
            self.assigned.setdefault(u, 0)
        self._rr = itertools.count()

    @classmethod
    def from_router(cls, router_url: str, api_key: str | None = None, model: str = "default",
                    min_workers: int = 1, timeout_s: float = 60.0) -> "EnginePool":
        return cls(router_workers(router_url, api_key, min_workers, timeout_s), api_key=api_key, model=model,
                   router_url=router_url.rstrip("/"))

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

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def router_workers(router_url: str, api_key: str | None = None, min_workers: int = 1,
                   timeout_s: float = 60.0) -> list[str]:
    """Healthy worker URLs registered with an sglang-router (it registers workers in the background, so
    wait until at least `min_workers` are there)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        try:
            r = httpx.get(f"{router_url.rstrip('/')}/workers", headers=headers, timeout=5)
            if r.status_code == 200:
                urls = [w["url"] for w in r.json().get("workers", []) if w.get("is_healthy", True)]
                if len(urls) >= min_workers:
                    return sorted(urls)
                last = f"{len(urls)} healthy worker(s)"
            else:
                last = f"HTTP {r.status_code}: {r.text[:200]}"
        except (httpx.HTTPError, ValueError) as e:
            last = repr(e)
        if time.monotonic() > deadline:
            raise TimeoutError(f"sglang-router at {router_url} has fewer than {min_workers} healthy workers "
                               f"after {timeout_s:.0f}s ({last})")
        time.sleep(0.5)


def router_command(worker_urls: list[str], port: int, host: str = "127.0.0.1",
                   api_key: str | None = None, policy: str = "cache_aware") -> list[str]:
    """`sglang-router` in front of the workers. `api_key` is the workers' key (used for its health checks)."""
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *worker_urls,
           "--host", host, "--port", str(port), "--policy", policy, "--log-level", "warn"]
    if api_key:
        cmd += ["--api-key", api_key]
    return cmd


def start_router(worker_urls: list[str], api_key: str | None = None, timeout_s: float = 120.0):
    """Start an sglang-router subprocess (stopped like the env servers); returns its ServerProcess."""
    port = free_port()
    server = start_process("router", router_command(worker_urls, port, api_key=api_key),
                           f"http://127.0.0.1:{port}")
    wait_healthy(server, timeout_s)
    router_workers(server.url, api_key, min_workers=len(worker_urls), timeout_s=timeout_s)
    return server


def start_engine(serve_args: str, timeout_s: float, port: int | None = None, key: str | None = None):
    """Start `sglgym serve` on `port` (default: a free one) with `key` (default: a fresh one); returns
    (server, url, key). A restart passes the old port and key, so every client keeps its URL."""
    import secrets
    import shlex

    port, key = port or free_port(), key or secrets.token_hex(16)
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "sglgym.cli", "serve", "--port", str(port), "--api-key", key,
           "--log-level", "warning", *shlex.split(serve_args)]
    server = start_process("engine", cmd, url)
    print(f"[rollout] starting engine at {url} (log {server.log_path})", file=sys.stderr)
    wait_healthy(server, timeout_s, headers={"Authorization": f"Bearer {key}"})
    return server, url, key
