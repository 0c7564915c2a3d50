"""Analytic cost: FLOPs of every component of one DrPO and one DRaFT update, counted without weights.

The models are the real architectures on the meta device (drpo.cost.architectures); each component runs the
package's own call under ``torch.utils.flop_counter.FlopCounterMode`` and the backward is counted the same way,
from the autograd graph the forward built. FlopCounterMode counts matrix products, convolutions and attention
(2 FLOPs per multiply-add); element-wise work (norms, activations, the AdamW update, the ranking) counts 0.

Meta tensors carry no values, so the methods' own loss code (which checks scores, ranks and validates weights
by value) cannot run here; each component below makes the same package call the method makes, and the loss
is the method's own objective (drpo.methods.drpo.preference_loss). What differs from the timed updates
(drpo.cost.profile) and why the counts are still those of one update:

* one micro-step is counted with all K candidates at once and multiplied by ``accumulation x processes``:
  FLOPs are linear in the batch, and DRaFT's one-at-a-time streaming changes memory and time, not FLOPs;
* meta tensors carry no values, so the reward's ``_score`` is called directly (``Reward.score`` checks the
  values), anchors come from ``select_anchors`` on stand-in scores, and the drift objective runs on random CPU
  tensors of the features' shapes (it validates its weights by value);
* the drift loss's gradient into the features is element-wise (spec 2.6: -2 F / (sigma N D)), so DrPO's
  backward is counted by back-propagating the sum of the features through the feature encoder and the UNet.

Reward activation checkpointing is the real Hugging Face mechanism (:func:`reward_checkpointing`), as in the
paper's profiler: its backward recomputes each checkpointed layer's forward up to the last tensor autograd
needs, i.e. a little less than one extra reward forward.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from drpo.cost.architectures import PROMPT, TINY, build_generator, build_mae, build_reward
from drpo.features.base import FeatureEncoder
from drpo.generators import OneStepGenerator
from drpo.methods.base import COMPONENTS
from drpo.methods.drpo import DrPOSettings, fresh_anchor_pass, preference_loss
from drpo.ranking import select_anchors
from drpo.rewards import Reward


@dataclass(frozen=True)
class UpdateShape:
    """What one counted update holds: ``processes`` x ``accumulation`` prompts of K = ``candidates``, DrPO's
    settings (its anchors and objective), whether the frozen base is sampled in the update and whether DRaFT
    checkpoints its reward."""

    processes: int
    accumulation: int
    candidates: int
    drpo: DrPOSettings
    online_reference: bool
    reward_checkpointing: bool

    def __post_init__(self) -> None:
        if self.drpo.num_pos + self.drpo.num_neg > self.candidates:
            raise ValueError(f"num_pos + num_neg = {self.drpo.num_pos + self.drpo.num_neg} exceeds "
                             f"K = {self.candidates} candidates")


@dataclass
class Models:
    """What an update touches: the generator (LoRA on its UNet), its LoRA parameters, the reward, the features."""

    generator: OneStepGenerator
    params: list[nn.Parameter]
    reward: Reward
    features: FeatureEncoder


@contextlib.contextmanager
def reward_checkpointing(reward: Reward, enabled: bool) -> Iterator[None]:
    """Activation checkpointing of a Hugging Face reward model (``reward.model``) for the duration of the block.

    transformers checkpoints only modules in training mode; the reward models have no dropout, so train mode
    changes nothing else. The previous mode is restored on exit.
    """
    if not enabled:
        yield
        return
    model = getattr(reward, "model", None)
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"reward {reward.name!r} has no Hugging Face model with gradient checkpointing; "
                         "count it with reward_checkpointing off")
    was_training = model.training
    model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    try:
        yield
    finally:
        model.activation_checkpointing_disable()
        model.train(was_training)


def count(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """(fn(*args, **kwargs), FLOPs it ran)."""
    with FlopCounterMode(display=False) as counter:
        out = fn(*args, **kwargs)
    return out, counter.get_total_flops()


def paper_models(generator: str, reward: str, *, device: str | torch.device = "meta",
                 dtype: torch.dtype = torch.float32, reward_batch: int = 1024, tiny: bool = False,
                 reward_options: dict | None = None) -> Models:
    """The models of one paper setting: generator with LoRA r16, reward, MAE-256 features (real sizes).

    On the meta device the reward scores all candidates in one call (``reward_batch``): chunking changes memory
    and time, not FLOPs. ``tiny`` builds the small stand-ins of drpo.cost.architectures.TINY (SD-Turbo layout).
    ``reward_options`` are extra keyword arguments of the reward's builder (e.g. HPSv3's ``text_tokens``).
    """
    if tiny and generator != "sd-turbo":
        raise ValueError(f"tiny stand-ins exist for the sd-turbo layout only, not {generator!r}")
    sizes = TINY if tiny else {}
    gen, params = build_generator(generator, device=device, dtype=dtype, **sizes.get("generator", {}))
    scorer = build_reward(reward, device=device, dtype=dtype, batch_size=reward_batch,
                          **sizes.get(reward, {}) | (reward_options or {}))
    return Models(gen, params, scorer, build_mae(device=device, **sizes.get("mae", {})))


@functools.lru_cache(maxsize=16)
def _drpo_loss_flops(shapes: tuple[tuple[str, tuple[int, ...]], ...], positives: int, negatives: int,
                     settings: DrPOSettings) -> int:
    """FLOPs of DrPO's objective for features of the given (key, shape), on random CPU tensors (values do not
    matter), with the reference drift when its weight is not zero."""
    g = torch.Generator().manual_seed(0)
    feats = {k: torch.randn(shape, generator=g) for k, shape in shapes}
    refs = {k: torch.randn(shape, generator=g) for k, shape in shapes} if settings.reference_loss_weight else None
    negative_features = {k: v[positives:positives + negatives] for k, v in feats.items()}
    return count(preference_loss, settings, feats, refs, torch.arange(positives), negative_features)[1]


def micro_step_flops(method: str, models: Models, settings: UpdateShape) -> dict[str, int]:
    """FLOPs per component of one micro-step (one prompt, K candidates) of ``method`` ("drpo" or "draft")."""
    gen, reward, k = models.generator, models.reward, settings.candidates
    flops = dict.fromkeys(COMPONENTS, 0)
    noise = torch.randn(k, *gen.latent_shape, device=gen.device)
    prompts = [PROMPT] * k
    cond, flops["text_encode"] = count(gen.encode_prompts, [PROMPT])
    latents, flops["student_generate"] = count(gen.sample, cond, noise)
    reference = latents.detach()
    if settings.online_reference:
        reference, flops["reference_generate"] = count(gen.sample, cond, noise, adapters=False)
    if method == "drpo":
        s = settings.drpo
        with torch.no_grad():
            images, flops["vae_decode"] = count(gen.decode, latents.detach())
            _, flops["reward_score"] = count(reward._score, images, prompts, None)
        (positives, negatives), flops["rank_select"] = count(select_anchors, torch.randn(1, k), s.num_pos, s.num_neg)
        feats, flops["features"] = count(models.features, latents.float(), cond=cond)
        with torch.no_grad():
            if s.reference_loss_weight or s.feature_l2_weight:
                flops["features"] += count(models.features, reference.float(), cond=cond)[1]
            if fresh_anchor_pass(models.features, s):  # FLOPs depend on the anchors' count only
                anchors = latents.detach()[: positives.shape[1] + negatives.shape[1]].float()
                flops["features"] += count(models.features, anchors, cond=cond)[1]
        shapes = tuple((k, tuple(v.shape)) for k, v in feats.items())
        flops["loss"] = _drpo_loss_flops(shapes, positives.shape[1], negatives.shape[1], s)
        _, flops["backward"] = count(lambda: sum(v.sum() for v in feats.values()).backward())
    elif method == "draft":
        images, flops["vae_decode"] = count(gen.decode, latents)
        with reward_checkpointing(reward, settings.reward_checkpointing):
            scores, flops["reward_score"] = count(reward._score, images, prompts, None)
            loss = -scores.mean()
            _, flops["backward"] = count(loss.backward)
    else:
        raise ValueError(f"unknown method {method!r}; expected 'drpo' or 'draft'")
    return flops


def update_flops(method: str, models: Models, settings: UpdateShape) -> dict[str, int]:
    """FLOPs per component of one whole update: processes x accumulation micro-steps (optimizer step: 0)."""
    scale = settings.processes * settings.accumulation
    return {c: v * scale for c, v in micro_step_flops(method, models, settings).items()}


def analytic_table(generators: Sequence[str], rewards: Sequence[str], settings: UpdateShape,
                   checkpointing: Sequence[bool] = (False, True), reward_options: dict[str, dict] | None = None,
                   tiny: bool = False, log: Callable[[str], None] = print) -> pd.DataFrame:
    """Long table of update FLOPs: generator, reward, method, reward_checkpointing, component, flops.

    DrPO never differentiates the reward, so it has one row set per setting (reward_checkpointing False);
    DRaFT has one per ``checkpointing`` value. ``reward_options``: reward name -> builder keyword arguments;
    ``tiny``: the small stand-ins instead of the real sizes (smoke runs).
    """
    rows = []
    for generator in generators:
        for reward in rewards:
            models = paper_models(generator, reward, reward_options=(reward_options or {}).get(reward), tiny=tiny)
            runs = [("drpo", False)] + [("draft", flag) for flag in checkpointing]
            for method, flag in runs:
                flops = update_flops(method, models, replace(settings, reward_checkpointing=flag))
                log(f"{generator} + {reward} {method} (reward checkpointing {flag}): "
                    f"{sum(flops.values()) / 1e15:.1f} PFLOP per update")
                rows += [{"generator": generator, "reward": reward, "method": method, "reward_checkpointing": flag,
                          "component": c, "flops": float(v)} for c, v in flops.items()]
    return pd.DataFrame.from_records(rows)


def speedups(table: pd.DataFrame) -> pd.DataFrame:
    """DRaFT / DrPO total-FLOP ratio per generator, reward and DRaFT checkpointing setting."""
    totals = table.groupby(["generator", "reward", "method", "reward_checkpointing"], sort=False)["flops"].sum()
    rows = []
    for (generator, reward, method, flag), total in totals.items():
        if method == "draft":
            drpo = totals[(generator, reward, "drpo", False)]
            rows.append({"generator": generator, "reward": reward, "reward_checkpointing": flag,
                         "drpo_pflop": drpo / 1e15, "draft_pflop": total / 1e15, "speedup": total / drpo})
    return pd.DataFrame.from_records(rows)
