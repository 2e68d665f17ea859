"""Test helpers for the rollout tests: in-thread HTTP servers (a scripted fake engine, faulty envs)."""

from __future__ import annotations

import json
import re
import threading
import time
from contextlib import contextmanager

import httpx
import psutil
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from sglgym.procs import free_port, pid_alive


@contextmanager
def serve_in_thread(app: FastAPI):
    """Run `app` with uvicorn in a daemon thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline:
            raise TimeoutError("in-thread server did not start")
        time.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def scripted_engine(script, tamper=None) -> FastAPI:
    """A fake token route. `script(messages, body) -> (content, tool_calls, finish_reason)`.

    Prompt ids follow the on-policy contract: the carried ids of the last assistant message, then a few
    ids for each newer message (ids = 100 + message index), then 7 ("assistant" header). Generated ids
    are the UTF-8 bytes of the content (+ EOS 2 when the turn stopped), logprob -0.5 each.
    `tamper(message, messages)` may edit the reply message (to simulate a broken server).
    """
    app = FastAPI()
    app.state.requests = []

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = json.loads(await request.body())
        app.state.requests.append(body)
        msgs = body["messages"]
        last = max((i for i, m in enumerate(msgs) if m.get("generation_token_ids") is not None), default=-1)
        prompt = [1] if last < 0 else list(msgs[last]["prompt_token_ids"]) + list(msgs[last]["generation_token_ids"])
        prompt += [100 + i for i in range(last + 1, len(msgs))] + [7]
        content, tool_calls, finish = script(msgs, body)
        gen = list((content or "").encode())[: body.get("max_tokens") or 64] + ([2] if finish != "length" else [])
        message = {"role": "assistant", "content": content, "tool_calls": tool_calls or None,
                   "prompt_token_ids": prompt, "generation_token_ids": gen,
                   "generation_log_probs": [-0.5] * len(gen)}
        if tamper:
            tamper(message, msgs)
        return {"choices": [{"index": 0, "message": message, "finish_reason": finish}]}

    return app


def tool_call(name: str, args: dict | str, call_id: str = "call_1") -> dict:
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": args if isinstance(args, str) else json.dumps(args)}}


def faulty_env(mode: str, delay_s: float = 0.0) -> FastAPI:
    """An env whose /verify misbehaves: non_json | no_reward | bad_reward | slow | http500; its `add` tool
    answers 422 (a bad call: the model's mistake) for a non-numeric `a`, and 500 (the server broke) for a < 0."""
    app = FastAPI()

    @app.post("/add")
    async def add(request: Request):
        args = json.loads(await request.body())
        if not isinstance(args.get("a"), (int, float)):
            return JSONResponse({"error": "a must be a number"}, status_code=422)
        if args["a"] < 0:
            return JSONResponse({"detail": "database is down"}, status_code=500)
        return {"result": args["a"] + args.get("b", 0)}

    @app.get("/health")
    async def health():
        return {"ok": True}

    @app.post("/seed_session")
    async def seed():
        return {}

    @app.post("/verify")
    async def verify(request: Request):
        body = json.loads(await request.body())
        if mode == "non_json":
            return PlainTextResponse("<html>Internal proxy page</html>")
        if mode == "no_reward":
            return {"responses_create_params": body["responses_create_params"], "score": 1}
        if mode == "bad_reward":
            return {"reward": "high"}
        if mode == "http500":
            return JSONResponse({"detail": "boom"}, status_code=500)
        if mode == "slow":
            import asyncio
            await asyncio.sleep(delay_s)
        return {"reward": 1.0}

    return app


def children_of(pid: int) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(pid).children()]
    except psutil.NoSuchProcess:
        return []


def wait_dead(pids, timeout_s: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [p for p in pids if pid_alive(p)]
        if not alive:
            return []
        time.sleep(0.1)
    return [p for p in pids if pid_alive(p)]


def get(url: str) -> httpx.Response:
    return httpx.get(url, timeout=5)


def requests_served(engine) -> float:
    text = httpx.get(engine.base_url + "/metrics", headers=engine.headers, timeout=10).text
    return sum(float(m.group(1)) for m in re.finditer(r"^sglang:num_requests_total\{[^}]*\} ([0-9.e+]+)$", text, re.M))
