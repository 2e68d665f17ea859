"""Supervised warm-up on the environments' own reference answers, so a random model has reward signal.

The prompt is rendered with the served model's own tokenizer and chat template, which give the same ids as
the engine's /tokenize (tests/test_engine_route.py checks that).
"""

from __future__ import annotations

from sglgym.rollout.responses import to_chat_messages, to_chat_tools
from sglgym.rollout.samples import Sample


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
