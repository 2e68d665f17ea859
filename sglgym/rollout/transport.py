"""Bounded HTTP pools and one JSON POST with a timeout and bounded retries.

Retries cover what a retry can fix: the connection failed or dropped, the server answered 502/503/504,
or the request timed out. Everything else (4xx, a non-JSON body) is returned or raised at once with the
body in the message.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import aiohttp

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


def make_client(max_connections: int, timeout_s: float = 60.0) -> aiohttp.ClientSession:
    """A bounded pool: at most `max_connections` sockets whatever the concurrency above it. aiohttp, not
    httpx: httpcore's pool scans every connection for every request, which cost the rollout client about
    one CPU core at 64 concurrent rollouts, as much as the engine it drives (py-spy, 2-core CPU demo).
    Call it inside the running event loop."""
    connector = aiohttp.TCPConnector(limit=max_connections, limit_per_host=0)
    # No cookie jar on the shared client: cookies are per rollout and sent explicitly.
    return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False,
                                 timeout=aiohttp.ClientTimeout(total=timeout_s, sock_connect=10.0))


async def _post_once(client: aiohttp.ClientSession, url: str, payload: bytes, headers: dict,
                     timeout_s: float) -> Reply:
    async with client.post(url, data=payload, headers=headers,
                           timeout=aiohttp.ClientTimeout(total=timeout_s, sock_connect=10.0)) as r:
        raw = await r.read()
        cookies = {name: morsel.value for name, morsel in r.cookies.items()}
        status = r.status
    text = raw.decode("utf-8", errors="replace")
    try:
        parsed = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        parsed = None
    return Reply(status, parsed, text, cookies)


async def post_json(client: aiohttp.ClientSession, url: str, body: object, *, timeout_s: float,
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
            reply = await _post_once(client, url, payload, headers, timeout_s)
            if reply.status not in RETRY_STATUS or attempt == retries:
                return reply
            last = f"HTTP {reply.status}: {reply.text[:300]}"
        except asyncio.TimeoutError:
            last = f"ReadTimeout: no complete answer within {timeout_s:g}s"
        except aiohttp.InvalidURL as e:
            raise TransportError(f"POST {url}: invalid URL ({e})") from None
        except aiohttp.ClientError as e:
            last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        if attempt < retries:
            await asyncio.sleep(backoff_s * (2 ** attempt))
    raise TransportError(f"POST {url} failed after {retries + 1} attempt(s): {last}")
