"""Base class of the built-in environments: a NeMo Gym-protocol resources server on FastAPI.

Endpoints (what NeMo Gym's agents call on a resources server):
  POST /seed_session   the dataset row; sets a session cookie the agent sends back on later calls
  POST /<tool_name>    one per tool; the JSON body is the tool call's arguments
  POST /verify         the row plus "response" (Responses API object with the rollout's output items);
                       answers the request echoed with "reward"
  POST /step           (multi-turn envs only) same body as /verify; answers the environment's next user
                       message {"observation": str | None, "terminated": bool}
  GET  /health
Rows are NeMo Gym JSONL rows: {"responses_create_params": {"input": [...], "tools": [...]},
"agent_ref": {...}, <env fields>}. Verification only reads the row and the response, so a verifier
never depends on server memory; the session only records what the tools were asked.
"""

from __future__ import annotations

import json
import random
import re
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

SESSION_COOKIE = "sglgym_session"
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def last_number(text: str | None) -> float | None:
    """The last number written in `text` (how answers are read from free-form replies)."""
    found = _NUMBER.findall(text or "")
    return float(found[-1]) if found else None


def output_text(item: dict) -> str:
    """Text of one Responses API output item of type message (content is a string or parts)."""
    content = item.get("content")
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content or [] if isinstance(p, dict))


def assistant_texts(response: dict) -> list[str]:
    return [output_text(o) for o in response.get("output") or []
            if o.get("type", "message") == "message" and o.get("role") == "assistant"]


def function_tool(name: str, description: str, properties: dict, required: list[str]) -> dict:
    """A tool in the Responses API format NeMo Gym rows use."""
    return {"type": "function", "name": name, "description": description, "strict": True,
            "parameters": {"type": "object", "properties": properties, "required": required,
                           "additionalProperties": False}}


class ResourcesServer:
    """Subclass: set `name`, implement `make_row` and `reward`; add tools with `tools()`; `observe` for
    multi-turn environments."""

    name = "base"
    multi_turn = False

    def __init__(self, **params: Any):
        self.params = params
        self.sessions: dict[str, dict] = {}

    # --- to implement -----------------------------------------------------------------------------
    def make_row(self, rng: random.Random, index: int, split: str) -> dict:
        raise NotImplementedError

    def reward(self, row: dict, response: dict, session: dict) -> float:
        raise NotImplementedError

    def tools(self) -> dict[str, tuple[dict, Callable[[dict], Any]]]:
        """tool name -> (Responses API tool spec, function of the parsed arguments)."""
        return {}

    def observe(self, row: dict, response: dict) -> tuple[str | None, bool]:
        """Multi-turn envs: the next user message and whether the episode is over."""
        return None, True

    # --- dataset ----------------------------------------------------------------------------------
    def dataset(self, n: int, seed: int = 0, split: str = "train") -> list[dict]:
        """n NeMo Gym rows; the same (n, seed, split) always gives the same rows, and splits differ."""
        rng = random.Random(f"{self.name}:{split}:{seed}")
        rows = []
        for i in range(n):
            row = self.make_row(rng, i, split)
            row.setdefault("agent_ref", {"type": "responses_api_agents", "name": self.name})
            tools = [spec for spec, _ in self.tools().values()]
            if tools:
                row["responses_create_params"].setdefault("tools", tools)
            rows.append(row)
        return rows

    # --- HTTP -------------------------------------------------------------------------------------
    def app(self) -> FastAPI:
        app = FastAPI(title=f"sglgym env {self.name}")

        async def body_of(request: Request) -> Any:
            try:
                return json.loads(await request.body() or b"{}")
            except json.JSONDecodeError as e:
                raise ValueError(f"request body is not JSON: {e}") from None

        def session_of(request: Request) -> dict:
            sid = request.cookies.get(SESSION_COOKIE)
            return self.sessions.get(sid, {}) if sid else {}

        @app.get("/health")
        async def health():
            return {"status": "ok", "env": self.name}

        @app.post("/seed_session")
        async def seed_session(request: Request):
            row = await body_of(request)
            sid = uuid.uuid4().hex
            self.sessions[sid] = {"tool_calls": 0}
            self.seed(row, self.sessions[sid])
            resp = JSONResponse({})
            resp.set_cookie(SESSION_COOKIE, sid)
            return resp

        @app.post("/verify")
        async def verify(request: Request):
            try:
                body = await body_of(request)
                response = body.get("response")
                if not isinstance(response, dict):
                    raise ValueError("'response' (the rollout's Responses API object) is required")
                session = session_of(request)
                reward = float(self.reward(body, response, session))
            except (ValueError, TypeError, KeyError) as e:
                return JSONResponse({"error": f"verify failed: {e}"}, status_code=422)
            sid = request.cookies.get(SESSION_COOKIE)
            self.sessions.pop(sid, None)  # the episode is over
            return {**body, "reward": reward, "tool_calls_made": session.get("tool_calls", 0)}

        if self.multi_turn:
            @app.post("/step")
            async def step(request: Request):
                try:
                    body = await body_of(request)
                    observation, terminated = self.observe(body, body.get("response") or {})
                except (ValueError, TypeError, KeyError) as e:
                    return JSONResponse({"error": f"step failed: {e}"}, status_code=422)
                return {"observation": observation, "terminated": bool(terminated)}

        for tool_name, (_, fn) in self.tools().items():
            app.add_api_route(f"/{tool_name}", self._tool_endpoint(fn, session_of, body_of), methods=["POST"])
        return app

    def seed(self, row: dict, session: dict) -> None:
        """Hook for envs that keep per-episode state."""

    @staticmethod
    def _tool_endpoint(fn, session_of, body_of):
        async def endpoint(request: Request):
            session = session_of(request)
            if session:
                session["tool_calls"] = session.get("tool_calls", 0) + 1
            try:
                args = await body_of(request)
                if not isinstance(args, dict):
                    raise ValueError("tool arguments must be a JSON object")
                return {"result": fn(args)}
            except (ValueError, TypeError, KeyError) as e:
                # A bad call is the model's mistake: it gets the error text back as the tool output.
                return JSONResponse({"error": str(e)}, status_code=422)
        return endpoint


def load_env_class(entrypoint: str) -> type[ResourcesServer]:
    """'package.module:ClassName' -> the class."""
    import importlib

    module, _, attr = entrypoint.partition(":")
    if not attr:
        raise ValueError(f"entrypoint must look like 'module:Class', got {entrypoint!r}")
    return getattr(importlib.import_module(module), attr)
