"""The on-policy fix across chat-template families, with tokenizers built here and templates in this file.

Gemma-style: turns end with `<end_of_turn>` while the tokenizer's EOS is `<eos>`. Qwen3-style: earlier
assistant turns lose their `<think>` reasoning once a newer user message follows.
"""

from __future__ import annotations

import pytest

from sglgym.engine.prompt import PromptBuilder, turn_end_token_id
from sglgym.engine.protocol import ApiError, Carried

GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages %}"
    "{%- set role = 'model' if message.role == 'assistant' else message.role %}"
    "{{- '<start_of_turn>' + role + '\\n' + (message.content or '') + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)

QWEN3_TEMPLATE = (
    "{%- set ns = namespace(last_query=0) %}"
    "{%- for message in messages %}{%- if message.role == 'user' %}{%- set ns.last_query = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if message.reasoning_content and loop.index0 > ns.last_query %}"
    "{{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{{- (message.content or '') + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tokenizer(specials: list[str], added: list[str], template: str, eos: str, bos: str | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [f"user {i} plus {i * 7} is {i * 8}. think about the answer, model" for i in range(300)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.add_tokens(added)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=bos, pad_token=specials[0])
    hf.chat_template = template
    return hf


@pytest.fixture(scope="module")
def gemma():
    return build_tokenizer(["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], [], GEMMA_TEMPLATE,
                           eos="<eos>", bos="<bos>")


@pytest.fixture(scope="module")
def qwen3():
    return build_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], ["<think>", "</think>"],
                           QWEN3_TEMPLATE, eos="<|im_end|>")


def turn(builder: PromptBuilder, tok, messages: list[dict], generated: str, carried: list[Carried], end: bool):
    """Prompt ids for `messages` and the ids an engine would return for `generated` (+ the turn end)."""
    prompt = builder.build(messages, carried, None, {})
    gen = tok.encode(generated, add_special_tokens=False) + ([builder.eos_token_id] if end else [])
    return prompt, gen


def test_turn_end_is_read_from_the_template(gemma, qwen3):
    assert turn_end_token_id(gemma, gemma.eos_token_id) == gemma.convert_tokens_to_ids("<end_of_turn>")
    assert gemma.eos_token_id == gemma.convert_tokens_to_ids("<eos>")
    assert turn_end_token_id(qwen3, qwen3.eos_token_id) == qwen3.convert_tokens_to_ids("<|im_end|>")


def test_gemma_style_multi_turn_is_contiguous(gemma):
    builder = PromptBuilder(gemma)
    user = [{"role": "user", "content": "3 plus 21"}]
    prompt, gen = turn(builder, gemma, user, "is 24", [], end=True)
    assert prompt[0] == gemma.bos_token_id
    # the model's own ids ("i" "s 2" ... merges a re-tokenization would not make) come back unchanged
    gen = [gemma.convert_tokens_to_ids(c) for c in "is"] + gen[1:]
    messages = [*user, {"role": "assistant", "content": "is 24"}, {"role": "user", "content": "4 plus 5"}]
    nxt = builder.build(messages, [Carried(1, prompt, gen)], None, {})
    assert nxt[:len(prompt) + len(gen)] == prompt + gen
    assert gemma.decode(nxt[len(prompt) + len(gen):]) == "\n<start_of_turn>user\n4 plus 5<end_of_turn>\n<start_of_turn>model\n"
    # the tokenizer's EOS is not the turn end: splicing on it is what failed before
    with pytest.raises(ApiError):
        PromptBuilder(gemma, eos_token_id=gemma.eos_token_id).build(messages, [Carried(1, prompt, gen)], None, {})


def test_gemma_style_turn_stopped_by_max_tokens(gemma):
    builder = PromptBuilder(gemma)
    user = [{"role": "user", "content": "3 plus 21"}]
    prompt, gen = turn(builder, gemma, user, "is 2", [], end=False)
    messages = [*user, {"role": "assistant", "content": "is 2"}, {"role": "user", "content": "go on"}]
    nxt = builder.build(messages, [Carried(1, prompt, gen)], None, {})
    assert nxt[:len(prompt) + len(gen)] == prompt + gen
    assert nxt[len(prompt) + len(gen)] == builder.eos_token_id   # the template's turn end closes the turn


def test_qwen3_style_dropped_reasoning_keeps_the_models_ids(qwen3):
    """The template drops turn 1's reasoning once a new user message follows; the carried ids keep it
    (the model's own context, as NeMo RL's fix does), and the new tail is the template's."""
    builder = PromptBuilder(qwen3)
    user = [{"role": "user", "content": "3 plus 21"}]
    prompt, gen = turn(builder, qwen3, user, "<think>\n3 plus 21 is 24\n</think>\n\n24", [], end=True)
    assistant = {"role": "assistant", "content": "24", "reasoning_content": "3 plus 21 is 24"}
    messages = [*user, assistant, {"role": "user", "content": "4 plus 5"}]
    template = builder.render_ids(messages, None, {}, add_generation_prompt=True)
    assert "<think>" not in qwen3.decode(template)   # the template alone would drop it
    nxt = builder.build(messages, [Carried(1, prompt, gen)], None, {})
    assert nxt[:len(prompt) + len(gen)] == prompt + gen
    assert qwen3.decode(nxt[len(prompt) + len(gen) - 1:]) == template_tail(qwen3, template)


def template_tail(tok, template_ids: list[int]) -> str:
    """The full render's text from its second turn end on (the tail after the carried turn)."""
    end = tok.convert_tokens_to_ids("<|im_end|>")
    positions = [i for i, t in enumerate(template_ids) if t == end]
    return tok.decode(template_ids[positions[1]:])


def test_qwen3_style_plain_history_splits_into_a_new_sequence(qwen3):
    """Without carried ids (agent.carry_token_ids: false) the template drops turn 1's reasoning, so the
    second prompt does not extend the first turn: the tracker starts a new sequence there."""
    from sglgym.rollout.tokens import ContiguityError, TokenTracker

    builder = PromptBuilder(qwen3)
    user = [{"role": "user", "content": "3 plus 21"}]
    prompt, gen = turn(builder, qwen3, user, "<think>\n3 plus 21 is 24\n</think>\n\n24", [], end=True)
    assistant = {"role": "assistant", "content": "24", "reasoning_content": "3 plus 21 is 24"}
    second_prompt = builder.build([*user, assistant, {"role": "user", "content": "4 plus 5"}], [], None, {})
    tracker = TokenTracker(split_on_break=True)
    tracker.add_turn(prompt, gen, [-0.5] * len(gen))
    tracker.add_turn(second_prompt, gen[:2], [-0.5, -0.5])
    sample = tracker.to_sample(reward=1.0, group_id=0, prompt_index=0, truncated=False, env="e", engine_url="")
    sample.validate()
    assert sample.segment_starts == [len(prompt) + len(gen)]
    assert sample.token_ids[sample.segment_starts[0]:] == second_prompt + gen[:2]
    with pytest.raises(ContiguityError):   # the carried-ids path would call this a bug
        strict = TokenTracker()
        strict.add_turn(prompt, gen, [-0.5] * len(gen))
        strict.add_turn(second_prompt, gen[:2], [-0.5, -0.5])
