"""Supervised warm-up on the environments' own reference answers, so a random model has reward signal.

The prompt is rendered with the served model's own tokenizer and chat template, which give the same ids as
the engine's /tokenize (tests/test_engine_route.py checks that).
"""

from __future__ import annotations

import time

from sglgym.rollout.responses import to_chat_messages, to_chat_tools
from sglgym.rollout.samples import Sample

from .batches import make_micro_batches, split_over_ranks
from .config import TrainConfig
from .policy import HFPolicy
from .ranks import Ranks
from .rows import RowSource


def prompt_ids(tokenizer, row: dict) -> list[int]:
    params = row["responses_create_params"]
    text = tokenizer.apply_chat_template(
        to_chat_messages(params["input"]), tools=to_chat_tools(params.get("tools")),
        add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def reference_samples(tokenizer, rows: list[dict]) -> list[Sample]:
    """Prompt + the row's reference answer + EOS, loss on the answer."""
    samples = []
    eos = tokenizer.eos_token_id
    for i, row in enumerate(rows):
        prompt = prompt_ids(tokenizer, row)
        answer = tokenizer.encode(str(row["expected_answer"]), add_special_tokens=False) + [eos]
        ids = prompt + answer
        samples.append(Sample(token_ids=ids, loss_mask=[0] * len(prompt) + [1] * len(answer),
                              gen_logprobs=[0.0] * len(ids), turn_spans=[(len(prompt), len(ids))], reward=1.0,
                              group_id=i, prompt_index=i, truncated=False, num_turns=1,
                              env=(row.get("agent_ref") or {}).get("name", ""), engine_url=""))
    return samples


def has_reference_answers(env) -> bool:
    return "expected_answer" in env.dataset(1, split="train")[0]


def _warmup_samples(cfg: TrainConfig, envs: dict, tokenizer) -> tuple[list[str], list[Sample]]:
    """Rank 0: the envs whose rows carry reference answers, and the warm-up's samples from them."""
    weights = {n: w for n, w in cfg.env_weights().items() if has_reference_answers(envs[n])}
    skipped = sorted(set(cfg.env_weights()) - set(weights))
    if skipped:
        print(f"[train] env(s) {skipped}: rows have no expected_answer, not in the warm-up", flush=True)
    if not weights:
        return [], []
    rows = RowSource(envs, weights, seed=10_000 + cfg.seed).take(cfg.sft_steps * cfg.sft_batch)
    return sorted(weights), reference_samples(tokenizer, rows)


def sft_warmup(cfg: TrainConfig, policy: HFPolicy, ranks: Ranks, envs: dict | None, tokenizer) -> dict:
    """`sft_steps` supervised steps at `sft_lr` (every rank; rank 0 reads the rows and hands out shares),
    then a fresh optimizer state for RL. The caller refits the engine."""
    if cfg.sft_steps <= 0:
        return {}
    t0 = time.perf_counter()
    names, samples = _warmup_samples(cfg, envs, tokenizer) if ranks.main else ([], [])
    names = ranks.broadcast(names)
    if not names:
        return {}
    for group in policy.optimizer.param_groups:
        group["lr"] = cfg.sft_lr
    loss = 0.0
    for step in range(cfg.sft_steps):
        batch = samples[step * cfg.sft_batch:(step + 1) * cfg.sft_batch]
        shares = ranks.per_rank(split_over_ranks(batch, [0.0] * len(batch), ranks.dp_size)) if ranks.main else None
        mine, zeros = ranks.scatter(shares)
        loss = policy.sft_step(make_micro_batches(mine, zeros, cfg.micro_batch_tokens))
    for group in policy.optimizer.param_groups:
        group["lr"] = cfg.lr
    # Fresh optimizer state for RL: the warm-up's Adam moments are for another objective.
    policy.optimizer.state.clear()
    out = {"sft_steps": cfg.sft_steps, "sft_final_loss": loss, "sft_s": time.perf_counter() - t0, "sft_envs": names}
    if ranks.main:
        print(f"[train] warm-up: {cfg.sft_steps} supervised steps on {names}, final loss {loss:.3f} "
              f"({out['sft_s']:.1f}s)", flush=True)
    return out
