"""Load generator for `sglgym bench`: the three routes, the same prompts, a closed loop of workers.

(a) `ours`        POST /v1/chat/completions (sglgym's token route: ids + logprobs in the message)
(b) `generate`    POST /generate (SGLang native, the same prompt ids, return_logprob)
(c) `sglang_chat` POST /sglang/v1/chat/completions (SGLang's own OpenAI chat route, logprobs)

A round is `concurrency` workers, each with its own httpx client holding one keep-alive connection
(`concurrency` connections in all); each worker sends requests back to back until the round's request
count or time limit is reached. One shared httpx pool of N connections costs the client O(N) CPU per
request: at 256 connections that was 14 ms of client CPU per request and capped the bench near 1k tok/s
on a 2-core machine, so the pool is split per worker.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import time
from dataclasses import dataclass, field

import httpx
import orjson

from .cpu import CpuMeter

ROUTES = ("ours", "generate", "sglang_chat", "ours_stream")
ROUTE_PATHS = {
    "ours": "/v1/chat/completions",
    "generate": "/generate",
    "sglang_chat": "/sglang/v1/chat/completions",
    "ours_stream": "/v1/chat/completions",
}
ROUTE_LABELS = {
    "ours": "(a) sglgym /v1/chat/completions",
    "generate": "(b) SGLang /generate",
    "sglang_chat": "(c) SGLang /sglang/v1/chat/completions",
    "ours_stream": "(d) sglgym /v1/chat/completions stream=true",
}
MAX_ERROR_SAMPLES = 5


@dataclass
class Prompt:
    messages: list[dict]
    ids: list[int]  # what /tokenize says the chat route feeds the engine; /generate gets exactly these


@dataclass
class Sampling:
    max_tokens: int = 64
    temperature: float = 1.0
    ignore_eos: bool = True


@dataclass
class RequestResult:
    ok: bool
    latency_s: float
    output_tokens: int = 0
    error: str | None = None


@dataclass
class RoundResult:
    route: str
    concurrency: int
    requests: int
    errors: int
    output_tokens: int
    elapsed_s: float
    latencies_s: list[float] = field(repr=False, default_factory=list)
    error_samples: list[str] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds by process role ("client", "main", ...)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def requests_per_s(self) -> float:
        return (self.requests - self.errors) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> dict:
        ok = self.requests - self.errors
        return {
            "requests": self.requests, "errors": self.errors, "output_tokens": self.output_tokens,
            "elapsed_s": round(self.elapsed_s, 4), "tokens_per_s": round(self.tokens_per_s, 2),
            "requests_per_s": round(self.requests_per_s, 3),
            "mean_output_tokens": round(self.output_tokens / ok, 2) if ok else None,
            "p50_ms": ms(percentile(self.latencies_s, 50)), "p99_ms": ms(percentile(self.latencies_s, 99)),
            "cpu_ms_per_request": {role: round(1000 * sec / ok, 3) for role, sec in self.cpu_s.items()} if ok else {},
            "error_samples": self.error_samples,
        }


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default); None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


# --- prompts ----------------------------------------------------------------------------------
def make_chats(count: int, seed: int = 0) -> list[list[dict]]:
    """Deterministic chats in the style of the built-in environments (one to three turns)."""
    rng = random.Random(seed)
    systems = ["You are a helpful assistant.", "Solve the task. Think step by step, then give the final value.",
               "You are a calculator. Use the tools when needed."]
    chats = []
    for i in range(count):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        chat = [{"role": "system", "content": rng.choice(systems)},
                {"role": "user", "content": f"What is {a} + {b}? Please compute the result."}]
        if i % 3 == 1:  # a finished turn before the question
            chat += [{"role": "assistant", "content": f"The answer is {a + b}."},
                     {"role": "user", "content": f"Now guess a number between 1 and {100 + b}: higher or lower?"}]
        if i % 3 == 2:  # a longer user turn
            chat[-1]["content"] += " " + " ".join(str(rng.randint(0, 99)) for _ in range(rng.randint(10, 60)))
        chats.append(chat)
    return chats


async def tokenize_prompts(client: httpx.AsyncClient, chats: list[list[dict]]) -> list[Prompt]:
    prompts = []
    for chat in chats:
        r = await client.post("/tokenize", json={"messages": chat})
        r.raise_for_status()
        prompts.append(Prompt(chat, r.json()["tokens"]))
    return prompts


# --- one request per route --------------------------------------------------------------------
def request_body(route: str, prompt: Prompt, sampling: Sampling, model: str | None) -> dict:
    if route == "generate":
        return {"input_ids": prompt.ids, "return_logprob": True,
                "sampling_params": {"max_new_tokens": sampling.max_tokens, "temperature": sampling.temperature,
                                    "ignore_eos": sampling.ignore_eos}}
    body = {"model": model, "messages": prompt.messages, "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature, "logprobs": True, "ignore_eos": sampling.ignore_eos}
    if route in ("ours", "ours_stream"):
        body["return_tokens_as_token_ids"] = True
    if route == "ours_stream":
        body["stream"] = True
    return body


def output_tokens(route: str, body: dict) -> int:
    """Generated tokens in a response; raises ValueError when the response lacks what was asked for."""
    if route == "ours":
        msg = body["choices"][0]["message"]
        n = len(msg["generation_token_ids"])
        if len(msg["generation_log_probs"]) != n or not msg["prompt_token_ids"]:
            raise ValueError("generation_log_probs / prompt_token_ids missing or inconsistent")
        return n
    if route == "generate":
        n = len(body["output_ids"])
        if len(body["meta_info"]["output_token_logprobs"]) != n:
            raise ValueError("output_token_logprobs missing or inconsistent")
        return n
    n = int(body["usage"]["completion_tokens"])
    if len(body["choices"][0]["logprobs"]["content"]) != n:
        raise ValueError("logprobs.content missing or inconsistent")
    return n


def streamed_tokens(lines: list[bytes]) -> int:
    """Generated tokens in an SSE stream: the logprob entries, checked against the closing bundle."""
    entries, bundle = 0, None
    for line in lines:
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        for choice in orjson.loads(line[6:])["choices"]:
            entries += len((choice.get("logprobs") or {}).get("content") or [])
            if choice.get("finish_reason"):
                bundle = choice["delta"]
    if lines[-1] != b"data: [DONE]" or bundle is None or len(bundle["generation_token_ids"]) != entries:
        raise ValueError("the stream lacks [DONE], the closing bundle, or a logprob entry per token")
    return entries


async def send_stream(client: httpx.AsyncClient, payload: bytes) -> RequestResult:
    t0 = time.perf_counter()
    async with client.stream("POST", ROUTE_PATHS["ours_stream"], content=payload,
                             headers={"Content-Type": "application/json"}) as r:
        if r.status_code != 200:
            return RequestResult(False, time.perf_counter() - t0, error=f"HTTP {r.status_code}")
        lines = [line.encode() async for line in r.aiter_lines() if line]
    return RequestResult(True, time.perf_counter() - t0, streamed_tokens(lines))


async def send(client: httpx.AsyncClient, route: str, prompt: Prompt, sampling: Sampling,
               model: str | None) -> RequestResult:
    payload = orjson.dumps(request_body(route, prompt, sampling, model))
    t0 = time.perf_counter()
    try:
        if route == "ours_stream":
            return await send_stream(client, payload)
        r = await client.post(ROUTE_PATHS[route], content=payload, headers={"Content-Type": "application/json"})
        raw = r.content
        latency = time.perf_counter() - t0
        if r.status_code != 200:
            return RequestResult(False, latency, error=f"HTTP {r.status_code}: {raw[:300]!r}")
        return RequestResult(True, latency, output_tokens(route, orjson.loads(raw)))
    except (httpx.HTTPError, ValueError, KeyError, TypeError, IndexError, orjson.JSONDecodeError) as e:
        return RequestResult(False, time.perf_counter() - t0, error=f"{type(e).__name__}: {e}"[:300])


# Below uvicorn's keep-alive timeout (SGLang: 5 s): the client drops an idle connection before the server
# closes it, instead of racing it (a request sent as the server closes fails with ReadError).
KEEPALIVE_EXPIRY_S = 2.0


def make_client(base_url: str, api_key: str | None, connections: int, timeout_s: float) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections,
                          keepalive_expiry=KEEPALIVE_EXPIRY_S)
    return httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits,
                             timeout=httpx.Timeout(timeout_s, connect=30.0))


class WorkerClients:
    """One client with one connection per worker: `concurrency` connections in all (async context manager)."""

    def __init__(self, base_url: str, api_key: str | None, concurrency: int, timeout_s: float):
        self.clients = [make_client(base_url, api_key, 1, timeout_s) for _ in range(concurrency)]

    def __len__(self) -> int:
        return len(self.clients)

    def __getitem__(self, worker: int) -> httpx.AsyncClient:
        return self.clients[worker]

    async def __aenter__(self) -> "WorkerClients":
        return self

    async def __aexit__(self, *exc) -> None:
        await asyncio.gather(*(c.aclose() for c in self.clients))


async def run_round(clients: WorkerClients, route: str, prompts: list[Prompt], sampling: Sampling,
                    model: str | None, concurrency: int, max_requests: int, time_limit_s: float,
                    prompt_offset: int = 0, meter: CpuMeter | None = None) -> RoundResult:
    """`concurrency` workers, back to back, until `max_requests` were sent or `time_limit_s` passed
    (requests in flight at the limit are waited for and counted; the elapsed time includes them)."""
    if len(clients) < concurrency:
        raise ValueError(f"{len(clients)} clients for {concurrency} workers")
    counter = itertools.count()
    results: list[RequestResult] = []
    meter = meter or CpuMeter()
    meter.start()
    start = time.perf_counter()
    deadline = start + time_limit_s

    async def worker(client: httpx.AsyncClient) -> None:
        while True:
            i = next(counter)
            if i >= max_requests or time.perf_counter() >= deadline:
                return
            results.append(await send(client, route, prompts[(prompt_offset + i) % len(prompts)], sampling, model))

    await asyncio.gather(*(worker(clients[w]) for w in range(concurrency)))
    elapsed = time.perf_counter() - start
    cpu = meter.stop()
    errors = [r for r in results if not r.ok]
    samples = list(dict.fromkeys(r.error for r in errors))[:MAX_ERROR_SAMPLES]
    return RoundResult(route, concurrency, len(results), len(errors), sum(r.output_tokens for r in results),
                       elapsed, [r.latency_s for r in results if r.ok], samples, cpu)
