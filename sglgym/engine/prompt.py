"""Prompt ids for a chat: the chat template, with the on-policy fix applied to carried ids."""

from __future__ import annotations

from collections import OrderedDict

import orjson

from .onpolicy import CarriedIdsError, splice_carried_prefix
from .protocol import ApiError, Carried


TURN_MARKER = "sglgym-turn-end-probe"


def turn_end_token_id(tokenizer, fallback: int | None = None) -> int | None:
    """The token the chat template closes an assistant turn with, read from the template itself.

    It is often not the tokenizer's EOS: Gemma's turns end with `<end_of_turn>` while EOS is `<eos>`,
    Llama 3's with `<|eot_id|>`. The first special (added) token rendered after an assistant message's
    content is the turn end; `fallback` (the EOS) when the template shows none.
    """
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": TURN_MARKER}]
    try:
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)
    except Exception:  # no template, or one that needs more than this: keep the EOS
        return fallback
    at = text.rfind(TURN_MARKER)
    if at < 0:
        return fallback
    added = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    for token in tokenizer.encode(text[at + len(TURN_MARKER):], add_special_tokens=False):
        if token in added:
            return token
    return fallback


class PromptBuilder:
    """Renders chats with the served tokenizer's chat template and splices in carried token ids."""

    def __init__(self, tokenizer, eos_token_id: int | None = None, cache_size: int = 1024):
        self.tokenizer = tokenizer
        # the id that closes an assistant turn in the template (not always the tokenizer's EOS)
        self.eos_token_id = eos_token_id if eos_token_id is not None else \
            turn_end_token_id(tokenizer, tokenizer.eos_token_id)
        # GRPO sends each prompt G times (one request per sample, as NeMo Gym does): rendering the chat
        # template once per group instead of once per request is most of the route's own CPU cost.
        self.cache_size = cache_size
        self._cache: OrderedDict[bytes, list[int]] = OrderedDict()
        self.cache_hits = 0

    def render_ids(self, messages: list[dict], tools: list[dict] | None, template_kwargs: dict,
                   add_generation_prompt: bool, continue_final: bool = False) -> list[int]:
        """Template ids of a chat (an LRU cache keyed by the exact JSON of what the template sees).
        `continue_final`: the last (assistant) message is left open, to be extended."""
        if continue_final:
            template_kwargs = {**template_kwargs, "continue_final_message": True}
        try:
            key = orjson.dumps([messages, tools, template_kwargs, add_generation_prompt])
        except TypeError:  # not JSON-serialisable (not from a request): no caching
            return self._render(messages, tools, template_kwargs, add_generation_prompt)
        ids = self._cache.get(key)
        if ids is not None:
            self._cache.move_to_end(key)
            self.cache_hits += 1
            return list(ids)
        ids = self._render(messages, tools, template_kwargs, add_generation_prompt)
        if self.cache_size > 0:
            self._cache[key] = ids
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return list(ids)

    def _render(self, messages: list[dict], tools: list[dict] | None, template_kwargs: dict,
                add_generation_prompt: bool) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt,
                **template_kwargs,
            )
        except Exception as e:  # template errors are the request's fault (bad roles, missing fields)
            raise ApiError(f"the chat template could not render 'messages': {e}", param="messages") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    def build(self, messages: list[dict], carried: list[Carried], tools: list[dict] | None,
              template_kwargs: dict, continue_final: bool = False) -> list[int]:
        """Ids the engine should see for this chat: a new assistant turn (generation prompt included), or
        with `continue_final` the last assistant message extended (a generation cut short, continued)."""
        if continue_final and carried and carried[-1].message_index == len(messages) - 1:
            return carried[-1].prefix_ids   # exactly what was seen and sampled so far
        template_ids = self.render_ids(messages, tools, template_kwargs, add_generation_prompt=not continue_final,
                                       continue_final=continue_final)
        if not carried:
            return template_ids
        last = carried[-1]
        i = last.message_index
        prefix_ids = self.render_ids(messages[: i + 1], tools, template_kwargs, add_generation_prompt=False)
        self._check_turn_count(last, prefix_ids)
        try:
            return splice_carried_prefix(last.prefix_ids, prefix_ids, template_ids, self.eos_token_id)
        except CarriedIdsError as e:
            raise ApiError(f"messages[{i}]: {e}", param=f"messages[{i}].prompt_token_ids") from None

    def _check_turn_count(self, carried: Carried, template_prefix_ids: list[int]) -> None:
        # The carried ids and the rendered messages up to that assistant turn must close the same number
        # of turns; otherwise the ids belong to another conversation (or another point in this one).
        eos = self.eos_token_id
        ids = carried.prefix_ids
        carried_turns = sum(1 for t in ids if t == eos) + (0 if ids[-1] == eos else 1)
        rendered_turns = sum(1 for t in template_prefix_ids if t == eos)
        if eos is not None and carried_turns != rendered_turns:
            i = carried.message_index
            raise ApiError(
                f"messages[{i}] carries token ids that close {carried_turns} turns, but messages[0..{i}] "
                f"render {rendered_turns}: the carried ids are inconsistent with the messages",
                param=f"messages[{i}].prompt_token_ids",
            )
