"""A vision-language model as a pairwise judge of two generators (method spec 5.4).

The paper's preference-rate figures come from a VLM that sees one prompt and two images, one from each model, and
names the better image or a tie. Here:

* the two images of a pair share the prompt and the evaluation noise (keys ``(prompt_index, seed)``, the noise of
  :func:`drpo.evaluate.sample_images`), so they differ only by the model;
* the position of each model (shown first as "A" or second as "B") is swapped for about half of the keys, by a hash
  of the key (:func:`is_swapped`), so that a judge's preference for a position cancels out; answers are mapped
  back to the models before counting;
* answers are JSON ``{"winner": "A" | "B" | "tie", "confidence": ..., "reason": ...}``; :func:`parse_answer` also
  reads fenced JSON and plain prose, and calls anything else invalid;
* :func:`summarize` counts wins, losses, ties and invalid answers of the pair's first model and gives the two rates
  the paper may plot: the win rate without ties and the preference share with a tie as half a win.

The judge is any image-text-to-text model of transformers in a local folder (Qwen3-VL-8B-Instruct at paper scale,
the miniature's random tiny Qwen2-VL in CI: drpo.miniature.judge), decoded greedily.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

# Part of the order protocol: changing it changes which keys are swapped (so it is versioned, not configurable).
SWAP_SALT = "drpo-pairwise-judge/order/v1"
LABELS = ("A", "B", "tie")
INVALID = "invalid"
# A pair's outcome from the point of view of its first model.
OUTCOMES = ("win", "loss", "tie", INVALID)


# The untrained generator's name in judge.pairs.
BASE = "base"


# ----------------------------------------------------------------------------------- what is judged
def judged_seed(config: dict) -> int:
    """The training seed of the runs the judge compares: judge.train_seed, or the first of train.seeds."""
    return config["train"]["seeds"][0] if config["judge"]["train_seed"] is None else config["judge"]["train_seed"]


def judged_step(config: dict, method: str) -> int:
    """The checkpoint of ``method``'s run that the judge compares: judge.step, or the run's last checkpoint (by its
    own train.per_method settings); 0 for the base."""
    from drpo.config import checkpoint_steps, method_train

    if method == BASE:
        return 0
    train = method_train(config["train"], method)
    last = checkpoint_steps(train["steps"], train["checkpoint_every"])[-1]
    return last if config["judge"]["step"] is None else config["judge"]["step"]


def judged_methods(config: dict) -> list[str]:
    """The trained methods of judge.pairs (not "base"), in first-seen order; none when the stage is off."""
    if config["judge"]["model"] is None:
        return []
    return list(dict.fromkeys(name for pair in config["judge"]["pairs"] for name in pair if name != BASE))


# ----------------------------------------------------------------------------------- what the judge is asked
# The chat turn: TASK with the prompt, "Image A:" and the image shown first, "Image B:" and the image shown second,
# then CRITERIA.
TASK = """You compare two images that two text-to-image models made for the same text prompt.

Text prompt: "{prompt}"
"""
CRITERIA = """Decide which image is better, judging in this order:
1. Faithfulness to the prompt: every object it names is there, with the stated count, colours, attributes, \
positions, relations and style; nothing it asks for is missing and nothing unrelated dominates.
2. Image quality: clean shapes and geometry, no artefacts, distortions or broken parts, coherent lighting.
3. Overall appeal, only when the first two leave them level.
The letters carry no meaning: neither position is more likely to be the better one. Answer "tie" only when \
neither image is better on any of the three points.

Reply with one JSON object and nothing else:
{"winner": "A" or "B" or "tie", "confidence": a number from 0 to 1, "reason": "at most 25 words"}"""


def messages(prompt: str) -> list[dict[str, Any]]:
    """The one user turn the judge answers for ``prompt``: the task, image A (shown first), image B, the criteria
    and the answer format (the processor's chat template places each image's tokens)."""
    return [{"role": "user", "content": [
        {"type": "text", "text": TASK.format(prompt=prompt)},
        {"type": "text", "text": "Image A:"},
        {"type": "image"},
        {"type": "text", "text": "\nImage B:"},
        {"type": "image"},
        {"type": "text", "text": "\n" + CRITERIA},
    ]}]


def instruction(prompt: str) -> str:
    """The text of :func:`messages` with each image as <image>, for reading and for the tokenizer of the
    miniature's judge."""
    return "".join(part["text"] if part["type"] == "text" else "<image>" for part in messages(prompt)[0]["content"])


# ----------------------------------------------------------------------------------- position-bias control
def is_swapped(prompt_index: int, seed: int) -> bool:
    """Whether the pair's second model is shown first (as "A") for this key: the first 8 hex digits of
    SHA-256(salt:prompt_index:seed) are odd. Deterministic, and about half of all keys."""
    digest = hashlib.sha256(f"{SWAP_SALT}:{int(prompt_index)}:{int(seed)}".encode()).hexdigest()
    return int(digest[:8], 16) % 2 == 1


def outcome(label: str, swapped: bool) -> str:
    """The first model's outcome for the judge's ``label`` (A, B, tie or invalid, in the order shown)."""
    if label in ("tie", INVALID):
        return label
    first_shown_won = label == "A"
    return "win" if first_shown_won != swapped else "loss"


# ----------------------------------------------------------------------------------- reading answers
@dataclass(frozen=True)
class Parsed:
    label: str  # A, B, tie or invalid
    confidence: float | None = None
    reason: str | None = None


_FENCE = re.compile(r"```[a-zA-Z]*")
# A winner named in broken JSON or prose: 'winner: A', '"winner" = "tie"', 'Winner - image B'; not the answer
# format repeated ('"winner": "A" or "B" or "tie"').
_NAMED_WINNER = re.compile(r"winner\W{0,6}(?:is\s+)?(?:image\s+)?(A|B|tie)\b(?!\"?\s+or\b)", re.IGNORECASE)
# Standalone labels in prose: the capital letters (a lower-case "a" is an article) and "tie" in any case.
_LETTER = re.compile(r"(?<![\w'])([AB])(?![\w'])")
_TIE = re.compile(r"\btie\b", re.IGNORECASE)


def _label(value: Any) -> str | None:
    """A, B or tie from a JSON winner value ("a", "Image B", " Tie "), else None."""
    if not isinstance(value, str):
        return None
    text = re.sub(r"^(?:image|picture)\s+", "", value.strip(), flags=re.IGNORECASE).strip().lower()
    return {"a": "A", "b": "B", "tie": "tie"}.get(text)


def _first_object(text: str) -> str | None:
    """The first balanced {...} of ``text`` (braces inside JSON strings counted too), or None."""
    start = text.find("{")
    if start < 0:
        return None
    depth = 0
    for end in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        if depth == 0:
            return text[start:end + 1]
    return None


def _confidence(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def parse_answer(text: str) -> Parsed:
    """The judge's answer: code fences stripped, the first {...} read as JSON for its winner (and confidence and
    reason); failing that, a winner named in prose ("winner: B"), or a single standalone label (A, B or tie) in the
    text. An answer that names no label, or more than one label outside a JSON winner field ("A is sharper but B
    follows the prompt"), is invalid."""
    text = _FENCE.sub("", text or "")
    block = _first_object(text)
    if block is not None:
        try:
            data = json.loads(block)
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict):
            fields = {str(key).strip().lower(): value for key, value in data.items()}
            label = _label(fields.get("winner"))
            if label is not None:
                reason = fields.get("reason")
                return Parsed(label, _confidence(fields.get("confidence")), None if reason is None else str(reason))
    if named := _NAMED_WINNER.search(text):
        return Parsed(_label(named.group(1)))
    found = {match for match in _LETTER.findall(text)} | ({"tie"} if _TIE.search(text) else set())
    return Parsed(found.pop()) if len(found) == 1 else Parsed(INVALID)


# ----------------------------------------------------------------------------------- the model
class Judge:
    """A transformers image-text-to-text model and its processor, answering :func:`messages` greedily."""

    def __init__(self, model, processor, *, max_new_tokens: int):
        self.model = model
        self.processor = processor
        self.max_new_tokens = max_new_tokens

    @classmethod
    def load(cls, path: str | Path, *, device: str, dtype: str, max_new_tokens: int) -> Judge:
        """The judge in the local folder ``path`` (config.json, weights, tokenizer, image processor, chat
        template): AutoModelForImageTextToText, so that Qwen2-VL and Qwen3-VL (and any other VLM of transformers)
        load alike. Nothing is downloaded."""
        import torch
        from transformers import AutoModelForImageTextToText

        if not Path(path, "config.json").is_file():
            raise FileNotFoundError(f"judge model folder {path} has no config.json (judge.model names a local "
                                    "folder: nothing is downloaded)")
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype), local_files_only=True)
        return cls(model.to(device).eval(), load_processor(path), max_new_tokens=max_new_tokens)

    def answer(self, prompts: Sequence[str], first: Sequence[np.ndarray], second: Sequence[np.ndarray]) -> list[str]:
        """The judge's raw answer for each (prompt, image shown first, image shown second); images uint8 HWC."""
        import torch
        from PIL import Image

        texts = [self.processor.apply_chat_template(messages(prompt), tokenize=False, add_generation_prompt=True)
                 for prompt in prompts]
        images = [Image.fromarray(np.asarray(image)) for pair in zip(first, second) for image in pair]
        inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt").to(self.model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.no_grad():
            output = self.model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens,
                                         pad_token_id=self.processor.tokenizer.pad_token_id)
        return self.processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def load_processor(path: str | Path):
    """The folder's processor (AutoProcessor). The Qwen-VL processors of transformers 5 also hold a video
    processor, which needs torchvision; without it (the CPU environment of this project) the same processor class
    is built from the folder's tokenizer, image processor and chat template with no video processor: the judge
    only ever passes images, which that class handles exactly as it does with torchvision installed."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    else:
        processor = _processor_without_video(path)
    processor.tokenizer.padding_side = "left"  # batched generation continues every row at its end
    return processor


def _processor_without_video(path: str | Path):
    from unittest import mock

    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    from transformers.processing_utils import ProcessorMixin

    model_type = AutoConfig.from_pretrained(path, local_files_only=True).model_type
    name = PROCESSOR_MAPPING_NAMES.get(model_type)
    if name is None:
        raise ValueError(f"no transformers processor for a {model_type!r} judge in {path}")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    template = _chat_template(path) or tokenizer.chat_template
    if template is None:
        raise FileNotFoundError(f"judge model folder {path} has no chat template (chat_template.jinja, "
                                "chat_template.json or tokenizer_config.json's chat_template)")
    # ProcessorMixin checks each part's class by name, and the video part's base class is not importable without
    # torchvision (transformers replaces it by a placeholder); only that check is skipped, for this constructor.
    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, argument: None):
        image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        return getattr(transformers, name)(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                                           chat_template=template)


def _chat_template(path: str | Path) -> str | None:
    folder = Path(path)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").is_file():
        return json.loads((folder / "chat_template.json").read_text())["chat_template"]
    return None


# ----------------------------------------------------------------------------------- the pair loop
def pair_keys(n_prompts: int, seeds: Sequence[int], max_pairs: int | None, subset_seed: int) -> list[tuple[int, int]]:
    """The (prompt_index, seed) keys judged: every prompt with every seed or, with ``max_pairs``, that many of
    them drawn at random with ``subset_seed`` (the same keys for every pair of models); sorted."""
    keys = [(index, seed) for index in range(n_prompts) for seed in seeds]
    if max_pairs is not None and max_pairs < len(keys):
        keys = random.Random(subset_seed).sample(keys, max_pairs)
    return sorted(keys)


VERDICT_COLUMNS = ["prompt_index", "seed", "prompt", "swapped", "shown_first", "answer", "label", "confidence",
                   "reason", "winner", "outcome", "valid"]


def judge_pairs(judge, keys: Sequence[tuple[int, int]], prompts: Sequence[str], images_a: dict, images_b: dict, *,
                names: tuple[str, str], batch_size: int, log: Callable[[str], None] = print) -> pd.DataFrame:
    """One verdict per key: ``images_a[key]`` (model ``names[0]``) and ``images_b[key]`` (``names[1]``) shown in
    the key's order (:func:`is_swapped`) to ``judge`` (anything with :meth:`Judge.answer`), ``batch_size`` keys per
    call; ``prompts`` by prompt index. Columns VERDICT_COLUMNS; winner is a model name, tie or invalid, and outcome
    is the first model's (win, loss, tie, invalid)."""
    from tqdm import tqdm

    rows = []
    started = time.time()
    for start in tqdm(range(0, len(keys), batch_size), desc=f"judging {names[0]} vs {names[1]}", mininterval=10):
        batch = keys[start:start + batch_size]
        swapped = [is_swapped(*key) for key in batch]
        first = [images_b[key] if swap else images_a[key] for key, swap in zip(batch, swapped)]
        second = [images_a[key] if swap else images_b[key] for key, swap in zip(batch, swapped)]
        answers = judge.answer([prompts[index] for index, _ in batch], first, second)
        for (index, seed), swap, text in zip(batch, swapped, answers):
            parsed = parse_answer(text)
            result = outcome(parsed.label, swap)
            winner = {"win": names[0], "loss": names[1]}.get(result, result)
            rows.append({"prompt_index": index, "seed": seed, "prompt": prompts[index], "swapped": swap,
                         "shown_first": names[1] if swap else names[0], "answer": text, "label": parsed.label,
                         "confidence": parsed.confidence, "reason": parsed.reason, "winner": winner,
                         "outcome": result, "valid": result != INVALID})
    elapsed = time.time() - started
    log(f"judged {len(rows)} pairs of {names[0]} vs {names[1]} in {elapsed:.1f} s "
        f"({elapsed / max(len(rows), 1):.2f} s a pair)")
    return pd.DataFrame(rows, columns=VERDICT_COLUMNS)


# ----------------------------------------------------------------------------------- counting
def summarize(verdicts: pd.DataFrame) -> dict[str, Any]:
    """Counts of the first model's outcomes, and its two rates (None when undefined, e.g. every answer a tie):
    win_rate_excluding_ties = wins / (valid - ties), preference_share = (wins + ties / 2) / valid."""
    counts = {outcome_: int((verdicts["outcome"] == outcome_).sum()) for outcome_ in OUTCOMES}
    wins, losses, ties, invalid = (counts[o] for o in OUTCOMES)
    valid = wins + losses + ties
    decided = valid - ties
    return {"pairs": int(len(verdicts)), "wins": wins, "losses": losses, "ties": ties, "invalid": invalid,
            "valid": valid, "win_rate_excluding_ties": wins / decided if decided else None,
            "preference_share": (wins + ties / 2) / valid if valid else None,
            "swapped": int(verdicts["swapped"].sum()) if len(verdicts) else 0}


# ----------------------------------------------------------------------------------- the table
TABLE_COLUMNS = ["prompt_set", "method_a", "method_b", "pairs", "wins", "losses", "ties", "invalid",
                 "win_rate_excluding_ties", "preference_share"]


def judge_table(summary_files: Sequence[str | Path]) -> pd.DataFrame:
    """One row per (prompt set, pair of models) from the judge's summary.json files."""
    rows = [json.loads(Path(path).read_text()) for path in summary_files]
    return pd.DataFrame(rows, columns=[*TABLE_COLUMNS, "judge", "train_seed", "step_a", "step_b", "seeds"])


def _percent(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def write_judge_table(summary_files: Sequence[str | Path], csv_out: str | Path, markdown_out: str | Path,
                      html_out: str | Path) -> pd.DataFrame:
    """tables/judge.csv (rates as fractions), .md and .html (rates in %)."""
    from drpo.report import html, markdown

    table = judge_table(summary_files)
    table.to_csv(csv_out, index=False, float_format="%.4f")
    header = ["prompt set", "model A", "model B", "pairs", "A wins", "B wins", "ties", "invalid",
              "A win rate excl. ties (%)", "A preference share, ties half (%)"]
    rows = [[row.prompt_set, row.method_a, row.method_b, str(row.pairs), str(row.wins), str(row.losses),
             str(row.ties), str(row.invalid), _percent(row.win_rate_excluding_ties), _percent(row.preference_share)]
            for row in table.itertuples()]
    Path(markdown_out).write_text(markdown(header, rows))
    judges = ", ".join(sorted(set(table["judge"].astype(str))))
    Path(html_out).write_text(html(header, rows, "Pairwise preference of a vision-language judge",
                                   f"judge: {judges}; same prompt and noise for both images, order swapped for "
                                   "about half the pairs; '–': no decided pair"))
    return table
