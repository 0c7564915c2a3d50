"""Evaluation of a generator (the base, or the base with a LoRA checkpoint) on the test prompts.

Protocol (method spec 3.6): image j of prompt i uses a latent noise drawn from a generator seeded
with ``seed * 1_000_000 + i``, one image per (prompt, evaluation seed). Per image we record the
target reward and GenEval's verdict: in the miniature world the procedural detector's, elsewhere that of a
GenEval judge among the rewards (the official ``geneval`` worker, or ``geneval_lite``) when there is one.
Per prompt we record diversity: the mean pairwise cosine distance of the reward model's image
embeddings across seeds (the paper's CLIP/DINO diversity).

GenEval judges 320-400 images per task (80-100 prompts x 4 images). A small split can have a task with
2 prompts, where one image moves the task by several points, so ``evaluation_seeds`` gives the prompts of
such a task more seeds, up to a minimum number of images per task.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from drpo.generators import image_seed
from drpo.images import to_uint8

GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# Prompt-row fields that group prompts in a prompt set (Parti-Prompts' Category and Challenge), kept per image.
PROMPT_GROUPS = ("category", "challenge")


def evaluation_seeds(rows: list[dict], seeds: list[int], min_images_per_tag: int = 0) -> list[list[int]]:
    """The evaluation seeds of every row: ``seeds``, continued (max(seeds) + 1, + 2, ...) for the rows of a
    GenEval tag with fewer than ``min_images_per_tag`` images, so that the tag reaches that many. Rows
    without a tag keep ``seeds``."""
    counts: dict[str, int] = {}
    for row in rows:
        if row.get("tag") is not None:
            counts[row["tag"]] = counts.get(row["tag"], 0) + 1
    per_row = []
    for row in rows:
        n = len(seeds)
        if row.get("tag") is not None:
            n = max(n, -(-min_images_per_tag // counts[row["tag"]]))
        per_row.append(list(seeds) + [max(seeds) + 1 + k for k in range(n - len(seeds))])
    return per_row


@torch.no_grad()
def sample_latents(generator, prompts: list[str], seeds: list[int], *, batch_size: int,
                   adapters: bool = True, prompt_indices: list[int] | None = None) -> torch.Tensor:
    """Latents for every (prompt, seed): (len(prompts) * len(seeds), C, H, W), prompt-major, on CPU.

    ``prompt_indices`` are the prompts' indices in their split (the noise seed uses them);
    default 0..len(prompts)-1.
    """
    indices = list(range(len(prompts))) if prompt_indices is None else list(prompt_indices)
    image_seeds = [image_seed(seed, index) for index in indices for seed in seeds]
    flat_prompts = [p for p in prompts for _ in seeds]
    chunks = []
    for start in range(0, len(flat_prompts), batch_size):
        cond = generator.encode_prompts(flat_prompts[start:start + batch_size])
        chunk = generator.make_noise(seeds=image_seeds[start:start + batch_size])
        chunks.append(generator.sample(cond, chunk, adapters=adapters).float().cpu())
    return torch.cat(chunks)


@torch.no_grad()
def sample_images(generator, prompts: list[str], seeds: list[int], *, batch_size: int, adapters: bool = True,
                  prompt_indices: list[int] | None = None) -> np.ndarray:
    """uint8 images (len(prompts) * len(seeds), H, W, 3) for every (prompt, seed), prompt-major, with the
    evaluation's noises (:func:`sample_latents`)."""
    latents = sample_latents(generator, prompts, seeds, batch_size=batch_size, adapters=adapters,
                             prompt_indices=prompt_indices)
    return torch.cat([to_uint8(generator.decode(chunk.to(generator.device))) for chunk in latents.split(batch_size)
                      ]).numpy()


@torch.no_grad()
def score_latents(generator, reward, latents: torch.Tensor, rows: list[dict], seeds: list[int], *,
                  batch_size: int, world_spec=None, images_dir: str | Path | None = None,
                  held_out: dict | None = None, diversity_from: str | None = None,
                  prompt_indices: list[int] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Decode and score latents from :func:`sample_latents`.

    Returns (per-image table, per-prompt table). ``rows`` are the prompts' metadata (GenEval rows,
    or {"prompt": ...} at paper scale); ``world_spec`` enables the GenEval-lite detector;
    ``held_out`` maps labels to further rewards scored on the same images (column reward_<label>);
    ``prompt_indices`` are the rows' indices in their split (tables and sample folders use them).
    Without ``world_spec``, the first GenEval judge among the target and the held-out rewards (a reward with
    ``score_verdicts``: ``geneval``, ``geneval_lite``) gives the columns ``correct`` and ``reason``.
    Diversity is measured in the image embeddings of the held-out reward labelled ``diversity_from`` or, without
    one, of the target reward or, for a target without them (the detector), of the first held-out reward that has
    them; it is NaN when no reward has any.
    """
    indices = list(range(len(rows))) if prompt_indices is None else list(prompt_indices)
    held_out = held_out or {}
    if diversity_from is not None:
        embedder = held_out[diversity_from]
        if not hasattr(embedder, "embed_images"):
            raise ValueError(f"evaluate.diversity_from: the reward {diversity_from!r} has no image embeddings")
    else:
        embedder = next((r for r in (reward, *held_out.values()) if hasattr(r, "embed_images")), None)
    from drpo.world.detect import judge_image

    # GenEval's per-image verdict: the miniature's detector when the world is on, else a GenEval judge among the
    # rewards. The detector takes precedence: it also gives the strict verdict and the object counts, and in the
    # miniature the geneval_lite reward is that detector (the same verdicts), so the columns keep one source.
    judge = None if world_spec is not None else next(
        (r for r in (reward, *held_out.values()) if hasattr(r, "score_verdicts")), None)

    n_seeds = len(seeds)
    if latents.shape[0] != len(rows) * n_seeds:
        raise ValueError(f"{latents.shape[0]} latents for {len(rows)} prompts x {n_seeds} seeds")
    records, embeddings, images_u8 = [], [], []
    for start in tqdm(range(0, latents.shape[0], batch_size), desc="evaluate", leave=False):
        batch_rows = [rows[i // n_seeds] for i in range(start, min(start + batch_size, latents.shape[0]))]
        images = generator.decode(latents[start:start + batch_size].to(generator.device, generator.dtype))
        prompts = [row["prompt"] for row in batch_rows]
        # The judge scores and judges in one pass; its scores are not asked for again.
        judged, verdicts = (None, None) if judge is None else judge.score_verdicts(images, prompts, batch_rows)
        scores = judged if reward is judge else reward.score(images, prompts, metadata=batch_rows)
        extra = {label: (judged if other is judge else other.score(images, prompts, metadata=batch_rows)).tolist()
                 for label, other in held_out.items()}
        if embedder is not None:
            embeddings.append(embedder.embed_images(images).float().cpu())
        pixels = to_uint8(images).numpy()
        for offset, (row, score, image) in enumerate(zip(batch_rows, scores.tolist(), pixels)):
            flat = start + offset
            record = {"prompt_index": indices[flat // n_seeds], "seed": seeds[flat % n_seeds],
                      "prompt": row["prompt"], "tag": row.get("tag"), "reward": score,
                      **{f"reward_{label}": values[offset] for label, values in extra.items()},
                      **{key: row[key] for key in PROMPT_GROUPS if key in row}}
            if world_spec is not None:
                verdict = judge_image(image, row, world_spec)
                record |= {"correct": verdict.correct, "correct_strict": verdict.strict, "objects": verdict.objects,
                           "reason": verdict.reason}
            elif verdicts is not None:
                record |= {"correct": verdicts[offset]["correct"], "reason": verdicts[offset]["reason"]}
            records.append(record)
            if images_dir is not None:
                images_u8.append(image)
    per_image = pd.DataFrame.from_records(records)
    if embedder is not None:
        per_prompt = _diversity(torch.cat(embeddings), indices, n_seeds)
    else:
        per_prompt = pd.DataFrame({"prompt_index": np.asarray(indices), "diversity": np.nan})
    if images_dir is not None:
        from drpo.world.geneval import write_sample_folder

        grouped = [images_u8[i * n_seeds:(i + 1) * n_seeds] for i in range(len(rows))]
        write_sample_folder(images_dir, rows, grouped, indices=indices)
    return per_image, per_prompt


def _diversity(embeddings: torch.Tensor, prompt_indices: list[int], n_seeds: int) -> pd.DataFrame:
    """Mean pairwise cosine distance across seeds, per prompt."""
    n_prompts = len(prompt_indices)
    emb = torch.nn.functional.normalize(embeddings.view(n_prompts, n_seeds, -1), dim=-1)
    sim = emb @ emb.transpose(1, 2)
    off_diagonal = ~torch.eye(n_seeds, dtype=torch.bool)
    distance = (1 - sim[:, off_diagonal]).mean(dim=1) if n_seeds > 1 else torch.full((n_prompts,), float("nan"))
    return pd.DataFrame({"prompt_index": np.asarray(prompt_indices), "diversity": distance.numpy()})


def summarize(per_image: pd.DataFrame, per_prompt: pd.DataFrame, *, reward_scale: float,
              held_out_scales: dict[str, float] | None = None) -> dict:
    """One row of the results table: rewards x their report scales, GenEval-lite per tag and overall,
    diversity, and for prompts with a category (Parti-Prompts) the rewards per category under "categories". Rewards are means over prompts of the per-prompt means, so that every prompt weighs the same
    whatever its number of seeds; GenEval-lite is the accuracy over a tag's images, as in GenEval."""
    by_prompt = per_image.groupby("prompt_index")
    summary = {"reward": float(by_prompt["reward"].mean().mean() * reward_scale),
               "diversity": float(per_prompt["diversity"].mean())}
    for label, scale in (held_out_scales or {}).items():
        summary[f"reward_{label}"] = float(by_prompt[f"reward_{label}"].mean().mean() * scale)
    if "category" in per_image:
        summary["categories"] = _by_category(per_image, reward_scale, held_out_scales or {})
    # GenEval-lite with GenEval's semantics (the paper's metric) and strict (no more objects than asked); the
    # overall score is the mean of the per-task accuracies, as GenEval's.
    for column, prefix in (("correct", "geneval"), ("correct_strict", "geneval_strict")):
        if column in per_image:
            by_tag = per_image.groupby("tag")[column].mean()
            for tag in GENEVAL_TAGS:
                summary[f"{prefix}_{tag}"] = float(by_tag.get(tag, np.nan) * 100)
            summary[f"{prefix}_overall"] = float(by_tag.mean() * 100)
    return summary


def _by_category(per_image: pd.DataFrame, reward_scale: float, held_out_scales: dict[str, float]) -> dict:
    """Per prompt category (Parti-Prompts): the number of prompts and the rewards x their report scales, each a
    mean over the category's prompts of the per-prompt means."""
    scales = {"reward": reward_scale, **{f"reward_{label}": scale for label, scale in held_out_scales.items()}}
    by_prompt = per_image.groupby("prompt_index").agg({"category": "first", **{c: "mean" for c in scales}})
    return {str(category): {"prompts": len(group), **{c: float(group[c].mean() * s) for c, s in scales.items()}}
            for category, group in by_prompt.groupby("category")}
