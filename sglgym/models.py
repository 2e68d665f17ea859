"""The embedded default model: a tiny Qwen2 with a locally trained byte-level BPE tokenizer.

Everything is built here, deterministically, with no hub access: the tokenizer is trained with
`tokenizers` on a corpus generated from a fixed seed (it has merges, so re-tokenizing generated text
can give other ids than the ones generated), the weights come from a seeded random init, and the
result is saved in Hugging Face format under a cache directory keyed by the build recipe.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                           r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [PAD_TOKEN, "<|im_start|>", EOS_TOKEN]
# Added but not "special": the detokenizer must keep them in text so tool/reasoning parsers see them.
ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<think>", "</think>"]

# ChatML with hermes-style tools, the format SGLang's `qwen25` tool parser reads.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, "
    "\\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' %}"
    "{%- if not loop.first %}{{- '<|im_start|>system\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- elif message.role == 'user' %}"
    "{{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if message.reasoning_content and enable_thinking is not false %}"
    "{{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n' }}"
    "{%- endif %}"
    "{%- if message.content %}{{- message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls or [] %}"
    "{%- set fn = tool_call.function if tool_call.function else tool_call %}"
    "{%- if not loop.first or message.content %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\\\"name\\\": \\\"' + fn.name + '\\\", \\\"arguments\\\": ' }}"
    "{%- if fn.arguments is string %}{{- fn.arguments }}{%- else %}{{- fn.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class TinyModelSpec:
    vocab_size: int = 1024  # tokenizer target; the model's vocab is rounded up to a multiple of 64
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    max_position_embeddings: int = 2048
    seed: int = 0
    recipe: int = 3  # bump when the build below changes


def _corpus(seed: int, lines: int = 6000) -> list[str]:
    """Text resembling what the built-in environments exchange: numbers, arithmetic, hints, tools."""
    rng = random.Random(seed)
    words = ("the answer is what higher lower correct guess number between and of add mul sum "
             "product please compute result tool call final value you are a helpful assistant "
             "solve think step first then so let me try it was too high low right yes no").split()
    out = []
    for _ in range(lines):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        kind = rng.randrange(6)
        if kind == 0:
            out.append(f"What is {a} + {b}? The answer is {a + b}.")
        elif kind == 1:
            out.append(f"What is {a} * {b % 30}? The answer is {a * (b % 30)}.")
        elif kind == 2:
            out.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) + ".")
        elif kind == 3:
            out.append(f'<tool_call>\n{{"name": "add", "arguments": {{"a": {a}, "b": {b}}}}}\n</tool_call>')
        elif kind == 4:
            out.append(f"Guess a number between 1 and 100. {rng.choice(['higher', 'lower'])} {a % 100}")
        else:
            out.append(f"<|im_start|>user\n{a} {rng.choice(words)} {b}<|im_end|>\n<|im_start|>assistant\n")
    return out


def _build_tokenizer(spec: TinyModelSpec):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Qwen2's own normalizer and pre-tokenizer (digits split one by one): transformers' Qwen2Tokenizer
    # rebuilds exactly these, so the trainer's tokenizer and SGLang's agree on every string.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(spec.seed), trainer=trainer)
    tok.add_tokens(ADDED_TOKENS)
    return tok


def _spec_key(spec: TinyModelSpec) -> str:
    return hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    return Path(os.environ.get("SGLGYM_CACHE", Path.home() / ".cache" / "sglgym")) / "models"


def build_tiny_model(out_dir: str | os.PathLike | None = None, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Build (or reuse) the tiny model and return its Hugging Face directory.

    Deterministic: the same spec gives byte-identical tokenizer files and identical weights.
    """
    out = Path(out_dir) if out_dir else default_cache_dir() / f"tiny-qwen2-{_spec_key(spec)}"
    if (out / ".complete").exists():
        return out

    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)

    tok = _build_tokenizer(spec)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, bos_token=None,
        unk_token=None, model_max_length=spec.max_position_embeddings, clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(tmp)

    vocab = -(-len(tok.get_vocab()) // 64) * 64
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, max_position_embeddings=spec.max_position_embeddings,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=tok.token_to_id(EOS_TOKEN), pad_token_id=tok.token_to_id(PAD_TOKEN),
        torch_dtype="float32", use_sliding_window=False,
    )
    torch.manual_seed(spec.seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(tmp, safe_serialization=True)

    (tmp / ".complete").write_text(json.dumps(asdict(spec)))
    if out.exists():  # another process finished first
        import shutil
        shutil.rmtree(tmp)
    else:
        tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="sglgym build-model", description=build_tiny_model.__doc__)
    p.add_argument("--out", default=None, help="output directory (default: the cache)")
    args = p.parse_args(argv)
    print(build_tiny_model(args.out))
