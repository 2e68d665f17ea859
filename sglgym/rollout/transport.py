"""Bounded HTTP pools and one JSON POST with a timeout and bounded retries.

Retries cover what a retry can fix: the connection failed or dropped, the server answered 502/503/504,
or the request timed out. Everything else (4xx, a non-JSON body) is returned or raised at once with the
body in the message.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import httpx

RETRY_STATUS = (502, 503, 504)


@dataclass
class Reply:
    status: int
    body: object            # parsed JSON, or None when the body was not JSON
    text: str
    cookies: dict

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class TransportError(Exception):
    """The server could not be reached (or kept failing) within the retries."""


def make_client(max_connections: int, timeout_s: float = 60.0) -> httpx.AsyncClient:
    # Bounded pool: at most `max_connections` sockets per client whatever the concurrency above it.
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    # No cookie jar on the shared client: cookies are per rollout and sent explicitly.
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_s, connect=10.0),
                             cookies=None, trust_env=False)


async def post_json(client: httpx.AsyncClient, url: str, body: object, *, timeout_s: float,
                    retries: int = 2, headers: dict | None = None, cookies: dict | None = None,
                    backoff_s: float = 0.25) -> Reply:
    headers = dict(headers or {})
    if cookies:
        headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
    payload = json.dumps(body).encode()
    headers["Content-Type"] = "application/json"
    last: str = ""
    for attempt in range(retries + 1):
        try:
            r = await client.post(url, content=payload, headers=headers, timeout=timeout_s)
            if r.status_code in RETRY_STATUS and attempt < retries:
                last = f"HTTP {r.status_code}: {r.text[:300]}"
            else:
                try:
                    parsed = r.json()
                except (json.JSONDecodeError, UnicodeDecodeError):
                    parsed = None
                return Reply(r.status_code, parsed, r.text, dict(r.cookies))
        except (httpx.TransportError, httpx.TimeoutException) as e:
            last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        if attempt < retries:
            await asyncio.sleep(backoff_s * (2 ** attempt))
    raise TransportError(f"POST {url} failed after {retries + 1} attempt(s): {last}")
