"""Asynchronous GRPO, engine side, against a live `sglgym serve`: a weight update leaves no KV computed
under older weights in the prefix cache, and a turn it cuts short is continued under the new weights with
the weight version of every token known (partial rollout)."""

from __future__ import annotations

import asyncio

import torch

from sglgym.rollout.agent import LoopOptions
from sglgym.rollout.transport import make_client
from sglgym.rollout.turn import model_turn, version_number
from sglgym.trainer.refit import refit_from_tensor

USER = [{"role": "user", "content": "Count slowly from one to one hundred, please."}]


def perturbed(base, seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(n, t + 0.05 * torch.randn(t.shape, generator=g, dtype=t.dtype)) for n, t in base.named_tensors()]


def hf_with(tiny_model_path: str, named: list[tuple[str, torch.Tensor]]):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, torch_dtype=torch.float32).eval()
    model.load_state_dict(dict(named), strict=True)
    return model


def scored(model, ids: list[int], start: int) -> torch.Tensor:
    """logprob of ids[start:], each given everything before it."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    return logp[torch.arange(start - 1, len(ids) - 1), torch.tensor(ids[start:])]


def chat(engine, body: dict) -> dict:
    with engine.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "sglgym-tiny", **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_update_leaves_no_stale_prefix_cache(engine, control, restore_engine, tiny_model_path):
    body = {"messages": USER, "max_tokens": 8, "temperature": 1.0}
    chat(engine, body)
    again = chat(engine, body)
    prompt_len = again["usage"]["prompt_tokens"]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= prompt_len - 1   # a warm prefix cache

    new = perturbed(restore_engine, seed=1)
    refit_from_tensor(control, new, version="step-41")
    out = chat(engine, body)
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 0   # its first reuse after the update
    choice = out["choices"][0]
    assert choice["weight_version"] == "step-41"
    assert choice["weight_versions"] == [{"version": "step-41", "start": 0,
                                          "end": len(choice["message"]["generation_token_ids"])}]
    m = choice["message"]
    ids, lps = m["prompt_token_ids"] + m["generation_token_ids"], torch.tensor(m["generation_log_probs"],
                                                                              dtype=torch.float64)
    new_lps = scored(hf_with(tiny_model_path, new), ids, len(m["prompt_token_ids"]))
    old_lps = scored(hf_with(tiny_model_path, restore_engine.named_tensors()), ids, len(m["prompt_token_ids"]))
    assert (lps - new_lps).abs().max() <= 1e-4        # sampled by the new weights
    assert (lps - old_lps).abs().max() > 1e-2         # (and the update changed them enough to tell)


async def _turn_cut_by(engine, cut, delay_s: float, continue_aborted: int = 4):
    """One 1500-token turn through the agent's `model_turn`, with `cut()` run (in a thread) after delay_s."""
    opts = LoopOptions(engine_timeout_s=120.0, retries=0, continue_aborted=continue_aborted)
    body = {"model": "sglgym-tiny", "messages": USER, "max_tokens": 1500, "temperature": 1.0, "ignore_eos": True}
    async with make_client(4, timeout_s=120) as client:
        task = asyncio.create_task(model_turn(client, engine.base_url, body, opts, engine.headers))
        await asyncio.sleep(delay_s)
        await asyncio.to_thread(cut)
        return await task


def _check_logprobs(turn, cut: int, old_model, new_model) -> None:
    m = turn.message
    prompt, gen = m["prompt_token_ids"], m["generation_token_ids"]
    assert len(gen) == 1500 and len(m["generation_log_probs"]) == 1500
    lps = torch.tensor(m["generation_log_probs"], dtype=torch.float64)
    old_lps = scored(old_model, prompt + gen, len(prompt))
    assert (lps[:cut] - old_lps[:cut]).abs().max() <= 1e-4
    if new_model is not None:
        new_lps = scored(new_model, prompt + gen, len(prompt))
        assert (lps[cut:] - new_lps[cut:]).abs().max() <= 1e-4   # a stale KV cache would not match
        assert (lps[cut:] - old_lps[cut:]).abs().max() > 1e-2


def test_turn_cut_by_an_update_finishes_under_the_new_weights(engine, control, restore_engine, tiny_model_path):
    """A refit mid-generation pauses the engine (retract), flushes the cache, loads the new weights and
    continues: the request is prefilled again under the new weights and finishes. Tokens before the cut
    carry the old version and the old weights' logprobs, tokens after it the new ones. (When SGLang
    aborts the request instead, the agent continues it: either way the turn is whole.)"""
    old_version = version_number(control.weight_version())
    new = perturbed(restore_engine, seed=2)
    for attempt in range(3):   # the cut must land mid-generation: the first try almost always does
        version = 50 + attempt
        turn = asyncio.run(_turn_cut_by(engine, lambda: refit_from_tensor(control, new, f"step-{version}"),
                                        0.5 + attempt))
        if turn.versions[0] == old_version:
            break
        refit_from_tensor(control, restore_engine.named_tensors(), version=f"step-{old_version}")
    cut = turn.versions.index(version)
    assert 0 < cut < 1500 and turn.versions == [old_version] * cut + [version] * (1500 - cut)
    assert turn.choice["finish_reason"] == "length"
    _check_logprobs(turn, cut, hf_with(tiny_model_path, restore_engine.named_tensors()),
                    hf_with(tiny_model_path, new))


def test_aborted_turn_is_continued(engine, control, tiny_model_path):
    """SGLang aborting the turn in flight: with continue_aborted the agent sends the partial message back
    (continue_final_message with its ids) and the engine samples the rest; the joined turn is contiguous,
    whole and scored by the same weights throughout. Without it the rollout fails (test_rollout_live)."""
    from transformers import AutoModelForCausalLM

    def abort_all():
        with engine.client() as c:
            assert c.post("/abort_request", json={"abort_all": True}).status_code == 200

    turn = asyncio.run(_turn_cut_by(engine, abort_all, 1.0, continue_aborted=1))
    assert turn.continuations == 1 and turn.choice["finish_reason"] == "length"
    version = version_number(control.weight_version())
    assert turn.versions == [version] * 1500
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, torch_dtype=torch.float32).eval()
    _check_logprobs(turn, 1500, model, None)


def test_continue_final_message_extends_the_carried_turn(engine, tokenizer):
    first = chat(engine, {"messages": USER, "max_tokens": 6, "temperature": 1.0, "ignore_eos": True})
    m = first["choices"][0]["message"]
    partial = {"role": "assistant", "content": m["content"] or "",
               **{k: m[k] for k in ("prompt_token_ids", "generation_token_ids", "generation_log_probs")}}
    body = {"messages": [*USER, partial], "max_tokens": 5, "temperature": 1.0, "ignore_eos": True,
            "continue_final_message": True, "add_generation_prompt": False}
    out = chat(engine, body)["choices"][0]["message"]
    assert out["prompt_token_ids"] == m["prompt_token_ids"] + m["generation_token_ids"]
    assert len(out["generation_token_ids"]) == 5
    whole = tokenizer.decode(m["generation_token_ids"] + out["generation_token_ids"], skip_special_tokens=True)
    assert (out["content"] or "") == whole     # the text of the whole message, decoded as one

    with engine.client() as c:   # only an assistant message can be continued; add_generation_prompt alone is refused
        r = c.post("/v1/chat/completions", json={"messages": USER, "continue_final_message": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message"
        r = c.post("/v1/chat/completions", json={"messages": USER, "add_generation_prompt": False})
        assert r.status_code == 400 and r.json()["error"]["param"] == "add_generation_prompt"
