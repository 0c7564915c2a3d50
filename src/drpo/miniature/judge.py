"""The miniature's pairwise judge: a tiny, randomly initialised Qwen2-VL in the folder layout of the real ones.

It stands in for Qwen3-VL-8B-Instruct (method spec 5.4) so that the judge stage runs end to end on a CPU in
seconds, through the very loading and generation code of :mod:`drpo.judge` (AutoModelForImageTextToText,
the Qwen2-VL processor, the chat template, greedy decoding). Its weights are random, so its answers are noise: it
checks the code path, not preferences (most answers are invalid, and a stray "A" or "B" counts as a vote).

The folder holds what a Qwen2-VL release holds: config.json and model.safetensors (Qwen2VLForConditionalGeneration
with every size written out; transformers 5's defaults are the 72B model), a byte-level BPE tokenizer with the
Qwen2-VL special tokens (built here with the `tokenizers` library: the 256 byte symbols, merges that make the
instruction's and the world's words single tokens, then the special tokens), a chat template, and the image
processor's preprocessor_config.json with small pixel bounds.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

# The special tokens of Qwen2-VL's tokenizer, in its order (ids after the regular vocabulary, as there).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")

# A ChatML template: each turn between <|im_start|>role and <|im_end|>; an image item of a turn's content becomes
# <|vision_start|><|image_pad|><|vision_end|>, which the processor widens to one pad per merged image patch.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_judge_tokenizer(words: Iterable[str]):
    """A Qwen2Tokenizer (byte-level BPE) in which each of ``words`` (with and without a leading space) is one token,
    followed by the Qwen2-VL special tokens. Any other text still tokenizes, byte by byte."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    from drpo.tiny import add_merges_for_word

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    splitter = Qwen2Tokenizer(vocab=dict(vocab), merges=[]).backend_tokenizer.pre_tokenizer
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(words):
        for text in (word, " " + word):
            for piece, _ in splitter.pre_tokenize_str(text):
                add_merges_for_word(list(piece), ranks, merges, vocab)
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                          unk_token=None, extra_special_tokens=list(SPECIAL_TOKENS[1:]), padding_side="left",
                          chat_template=CHAT_TEMPLATE)


def judge_words(prompts: Iterable[str]) -> list[str]:
    """The words the miniature's judge tokenizes whole: those of the instruction, of the answer format and of the
    prompts, in first-seen order."""
    from drpo.judge import instruction

    text = instruction("") + ' {"winner": "A", "confidence": 0.5, "reason": ""} tie B ' + " ".join(prompts)
    return list(dict.fromkeys(re.findall(r"[A-Za-z]+|[0-9]|[^\sA-Za-z0-9]", text)))


def build_tiny_judge(out_dir: str | Path, *, words: Iterable[str] = (), seed: int = 0, hidden: int = 32,
                     layers: int = 2, heads: int = 2, vision_hidden: int = 32, vision_layers: int = 2,
                     vision_heads: int = 2, min_pixels: int = 56 * 56, max_pixels: int = 112 * 112) -> dict[str, Any]:
    """Save a random tiny Qwen2-VL judge (model, tokenizer, image processor, chat template) into ``out_dir``,
    deterministic from ``seed``; return its sizes. The text model has ``layers`` layers of width ``hidden`` and
    ``heads`` heads (one key-value head), the vision tower ``vision_layers`` of width ``vision_hidden``; images
    are resized to between ``min_pixels`` and ``max_pixels`` pixels (14-pixel patches, 2x2 merged: 4 to 16 image
    tokens)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if hidden % heads or (hidden // heads) % 4:
        raise ValueError(f"hidden ({hidden}) / heads ({heads}) must be a multiple of 4 (rotary sections)")
    tokenizer = build_judge_tokenizer(judge_words(words))
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    half = hidden // heads // 2  # rotary frequencies per head, split over (time, height, width) as Qwen2-VL does
    text = {
        "vocab_size": len(tokenizer), "hidden_size": hidden, "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": 1,
        "max_position_embeddings": 4096, "max_window_layers": layers, "use_sliding_window": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                            "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]},
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
    }
    vision = {"depth": vision_layers, "embed_dim": vision_hidden, "hidden_size": hidden, "num_heads": vision_heads,
              "mlp_ratio": 2, "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14,
                                               merge_size=2, temporal_patch_size=2)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    model.save_pretrained(out_dir)  # config.json, the rule's output, among the last files written
    return {"parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer),
            "hidden": hidden, "layers": layers, "vision_hidden": vision_hidden, "vision_layers": vision_layers}


def build_miniature_judge(spec, rows: list[dict], *, out_dir: str | Path, seed: int, device: str = "cpu",
                          **kwargs) -> dict[str, Any]:
    """The miniature_judge rule: :func:`build_tiny_judge` with the world's prompt words in its vocabulary, and its
    provenance.json (nothing is trained)."""
    from drpo.miniature.data import write_provenance

    started = time.time()
    sizes = build_tiny_judge(out_dir, words=[row["prompt"] for row in rows], seed=seed, **kwargs)
    write_provenance(out_dir, function="drpo.miniature.judge.build_tiny_judge", arguments=kwargs, seed=seed, steps=0,
                     started=started, metrics=sizes)
    return sizes
