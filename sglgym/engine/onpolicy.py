"""The on-policy token-id fix: build a multi-turn prompt from the ids the model really saw and made.

Re-tokenizing a generated reply rarely gives back the generated ids (BPE merges differ, partial UTF-8
bytes decode to U+FFFD, tool calls are re-formatted by the template), so a trainer that scores the
re-templated prompt scores tokens the policy never produced. The fix keeps the carried ids of the last
assistant turn and appends only the part of the freshly rendered template that comes after it.
"""

from __future__ import annotations

from collections.abc import Sequence


class CarriedIdsError(ValueError):
    """Carried token ids that cannot be spliced into the rendered conversation."""


def nth_index(ids: Sequence[int], value: int, n: int) -> int:
    """Position of the n-th (1-based) occurrence of `value` in `ids`, or -1."""
    seen = 0
    for pos, token in enumerate(ids):
        if token == value:
            seen += 1
            if seen == n:
                return pos
    return -1


def splice_carried_prefix(
    carried_prefix_ids: Sequence[int],
    template_prefix_ids: Sequence[int],
    template_ids: Sequence[int],
    eos_token_id: int | None,
) -> list[int]:
    """Return the prompt ids: carried ids of the conversation so far + the new tail of the template.

    carried_prefix_ids: the last assistant turn's `prompt_token_ids + generation_token_ids`, exactly as
        the engine saw and sampled them. It ends with EOS when generation stopped on EOS, and without
        one when it stopped on max_tokens or a stop string.
    template_prefix_ids: the chat template rendered up to and including that assistant message, with no
        generation prompt.
    template_ids: the full render of the new request (with generation prompt).
    eos_token_id: the id that ends an assistant turn in the template (e.g. `<|im_end|>`).

    The template closes the assistant turn with EOS, so the tail starts at that EOS in the full render.
    It is located as the N-th EOS of the full render, N = number of EOS in the template prefix, rather
    than at `len(template_prefix_ids)`: templates that drop earlier reasoning from history render a
    shorter full conversation, but they keep the count of turn ends. A trailing EOS of the carried ids is
    dropped first, since the tail starts with the template's own EOS.

    Empty carried ids return `template_ids` unchanged. Raises CarriedIdsError when there is no EOS id
    or the full render has fewer turn ends than the prefix (the messages and the carried ids disagree).
    """
    if not carried_prefix_ids:
        return list(template_ids)
    if eos_token_id is None:
        raise CarriedIdsError("the tokenizer has no EOS token, so carried ids cannot be spliced")
    eos_count = sum(1 for t in template_prefix_ids if t == eos_token_id)
    if eos_count == 0:
        raise CarriedIdsError("the rendered conversation has no EOS after the carried assistant turn")
    eos_pos = nth_index(template_ids, eos_token_id, eos_count)
    if eos_pos < 0:
        raise CarriedIdsError(
            f"the full render has fewer than {eos_count} EOS tokens; the messages do not continue the "
            "conversation the carried ids come from"
        )
    cut = len(carried_prefix_ids)
    if carried_prefix_ids[-1] == eos_token_id:
        cut -= 1
    return list(carried_prefix_ids[:cut]) + list(template_ids[eos_pos:])
