"""One model turn of a rollout: the chat call, and its continuation when a weight update cut it short.

An in-flight weight update (asynchronous training) pauses the engine, flushes its prefix cache and so
aborts the requests in flight: each comes back with `finish_reason: "abort"` and the tokens it had
sampled. With `continue_aborted` the turn is continued (a partial rollout): the partial message goes back
with its ids and `continue_final_message`, the engine prefills it under the new weights (the flushed cache
holds nothing older) and samples the rest. The turn's ids, logprobs and per-token weight versions are
the pieces joined; the text, tool calls and finish reason are the last reply's (parsed over the whole).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import aiohttp

from .errors import RolloutError
from .transport import Reply, TransportError, post_json

CARRIED = ("prompt_token_ids", "generation_token_ids", "generation_log_probs")


def version_number(version: str | None) -> int:
    """`step-N` (what `sglgym train` names its refits) -> N; the engine's first weights ("default") -> 0."""
    if isinstance(version, str) and version.startswith("step-") and version[5:].isdigit():
        return int(version[5:])
    return 0


def token_versions(choice: dict, num_generated: int) -> list[int]:
    """The weight version of every generated token, from the choice's `weight_versions` spans."""
    spans = choice.get("weight_versions") or [{"version": choice.get("weight_version"), "start": 0,
                                               "end": num_generated}]
    out: list[int] = []
    for span in spans:
        out += [version_number(span.get("version"))] * max(0, min(span["end"], num_generated) - len(out))
    return out + [out[-1] if out else 0] * (num_generated - len(out))


def is_context_error(reply: Reply) -> bool:
    return reply.status == 400 and "context length" in reply.text.lower()


@dataclass
class Turn:
    choice: dict                    # the last reply's choice (finish reason, message text and tool calls)
    message: dict                   # its message, with the joined ids and logprobs of the whole turn
    versions: list[int] = field(default_factory=list)   # weight version per generated token
    continuations: int = 0          # how often a weight update cut it and it was continued


async def _post(client: aiohttp.ClientSession, url: str, body: dict, engine_url: str, opts, headers: dict) -> Reply:
    try:
        return await post_json(client, url, body, timeout_s=opts.engine_timeout_s, retries=opts.retries,
                               headers=headers)
    except TransportError as e:
        raise RolloutError("engine", str(e), engine_url) from None


def _message(reply: Reply, engine_url: str) -> tuple[dict, dict]:
    if not reply.ok or not isinstance(reply.body, dict):
        raise RolloutError("engine", f"HTTP {reply.status}: {reply.text[:500]}", engine_url)
    choice = reply.body["choices"][0]
    msg = choice["message"]
    missing = [k for k in CARRIED if msg.get(k) is None]
    if missing:
        raise RolloutError("engine", f"the reply lacks {missing}: is {engine_url} an `sglgym serve` "
                                     "token route?", engine_url)
    return choice, msg


async def model_turn(client: aiohttp.ClientSession, engine_url: str, body: dict, opts, headers: dict) -> Turn | None:
    """The turn's reply; None when the conversation no longer fits the context (a truncated rollout)."""
    url = f"{engine_url}/v1/chat/completions"
    reply = await _post(client, url, body, engine_url, opts, headers)
    if is_context_error(reply):
        return None
    choice, msg = _message(reply, engine_url)
    turn = Turn(choice, msg, token_versions(choice, len(msg["generation_token_ids"])))
    while choice.get("finish_reason") == "abort":
        if turn.continuations >= opts.continue_aborted:   # the engine dropped it: its tokens are not a turn
            raise RolloutError("engine", "the engine aborted the generation (finish_reason 'abort')", engine_url)
        reply = await _post(client, url, _continuation(body, turn.message), engine_url, opts, headers)
        if is_context_error(reply):
            raise RolloutError("engine", "a continued generation no longer fits the context", engine_url)
        choice, msg = _message(reply, engine_url)
        turn = _joined(turn, choice, msg)
    return turn


def _continuation(body: dict, partial: dict) -> dict:
    out = {**body, "continue_final_message": True, "add_generation_prompt": False}
    out["messages"] = [*body["messages"], {"role": "assistant", "content": partial.get("content") or "",
                                           **{k: partial[k] for k in CARRIED}}]
    if body.get("max_tokens") is not None:
        out["max_tokens"] = max(1, body["max_tokens"] - len(partial["generation_token_ids"]))
    return out


def _joined(turn: Turn, choice: dict, msg: dict) -> Turn:
    before = turn.message
    if msg["prompt_token_ids"] != before["prompt_token_ids"] + before["generation_token_ids"]:
        raise RolloutError("contiguity", "a continued generation's prompt is not the partial turn it continues",
                           None)
    joined = {**msg, "prompt_token_ids": before["prompt_token_ids"],
              "generation_token_ids": before["generation_token_ids"] + msg["generation_token_ids"],
              "generation_log_probs": before["generation_log_probs"] + msg["generation_log_probs"]}
    versions = turn.versions + token_versions(choice, len(msg["generation_token_ids"]))
    return Turn(choice, joined, versions, turn.continuations + 1)
