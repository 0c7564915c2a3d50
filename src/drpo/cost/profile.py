"""Measured cost: per-component wall time of DrPO and DRaFT updates, on CPU or CUDA, with the paper's protocol.

Protocol (spec section 6): each component runs inside a timer that synchronises the device before and after
(``torch.cuda.synchronize`` on a GPU), component times are summed within an update, and the update time is the
synchronised wall time from the first micro-step to the end of the optimizer step. After ``warmup`` updates,
``updates`` updates are recorded; summaries give median, min and max over them. Several runs (e.g. DrPO and
DRaFT) take turns update by update, so that a change of load on a shared machine affects all of them alike.

Both update loops are built from the package's code paths: ``generator.encode_prompts / sample / decode``,
``Reward.score`` (without gradient for DrPO, ``with_grad=True`` for DRaFT), ``ranking.select_anchors``, the
feature encoder, ``drift.drpo_objective``, ``backward`` and a clipped AdamW step on the LoRA parameters.

* DrPO micro-step (one prompt, K candidates): student one-step with grad; frozen reference for the same noises;
  decode and score without grad; top / bottom anchors; features of candidates (grad) and reference (no grad);
  drpo_objective with the candidates' own detached features as anchors (as drpo.methods.drpo does); backward.
* DRaFT micro-step (spec section 4): the K candidates are streamed ``draft_chunk`` at a time through one-step
  (grad), decode (grad), reward (grad) and a backward of ``-sum(scores) / (K * accumulation)``; the reference is
  computed and discarded when ``online_reference`` is set, as in the paper's profiler. Optional activation
  checkpointing of the reward model (``reward_checkpointing``; the paper ran DRaFT with it on).
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from drpo.drift import drpo_objective
from drpo.features.base import FeatureEncoder
from drpo.generators import OneStepGenerator
from drpo.methods.base import PromptBatch
from drpo.methods.drpo import DrPOSettings
from drpo.ranking import select_anchors
from drpo.rewards import Reward

COMPONENTS = ("text_encode", "student_generate", "reference_generate", "vae_decode", "reward_score",
              "rank_select", "features", "loss", "backward", "optimizer_step")
METHODS = ("drpo", "draft")


@dataclass(frozen=True)
class UpdateSettings:
    """One optimizer update: ``processes`` x ``accumulation`` prompts, K = ``candidates`` each.

    Defaults are the paper's HPSv3 efficiency runs (spec section 6): 4 processes x 2 x 24 = 192 candidates,
    12 positives / 12 negatives, AdamW lr 1e-4 with clipping at 1, the reference sampled online for both methods,
    DRaFT streaming one candidate at a time with the reward checkpointed. ``processes`` only scales the analytic
    totals: a measured update is one process.
    """

    candidates: int = 24
    accumulation: int = 2
    processes: int = 4
    drpo: DrPOSettings = field(default_factory=lambda: DrPOSettings(num_pos=12, num_neg=12))
    online_reference: bool = True
    decode_chunk: int | None = 1
    draft_chunk: int = 1
    reward_checkpointing: bool = True
    learning_rate: float = 1e-4
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.drpo.num_pos + self.drpo.num_neg > self.candidates:
            raise ValueError(f"num_pos + num_neg = {self.drpo.num_pos + self.drpo.num_neg} exceeds "
                             f"K = {self.candidates} candidates")
        for name in ("candidates", "accumulation", "processes", "draft_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class Models:
    """What an update touches: the generator (LoRA on its UNet), its LoRA parameters, the reward, the features."""

    generator: OneStepGenerator
    params: list[nn.Parameter]
    reward: Reward
    features: FeatureEncoder


class SectionTimer:
    """Accumulates synchronised wall time per component: ``with timer("backward"): ...``."""

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def __call__(self, component: str) -> Iterator[None]:
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.seconds[component] += time.perf_counter() - start


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
                         "run with reward_checkpointing off")
    was_training = model.training
    model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    try:
        yield
    finally:
        model.activation_checkpointing_disable()
        model.train(was_training)


def drpo_loss(features: Mapping[str, Tensor], reference: Mapping[str, Tensor], positives: Tensor,
              negatives: Tensor, settings: DrPOSettings) -> Tensor:
    """Scalar DrPO loss of one prompt: features (K, T, D) per key, anchor indices (P,) and (M,) into the K."""
    feats = {name: value.unsqueeze(0) for name, value in features.items()}
    refs = {name: value.unsqueeze(0) for name, value in reference.items()}
    loss, _ = drpo_objective(
        feats, refs,
        {name: value.detach()[:, positives] for name, value in feats.items()},
        {name: value.detach()[:, negatives] for name, value in feats.items()},
        positive_weight=settings.positive_weight, negative_weight=settings.negative_weight,
        reference_weight=settings.reference_weight, reference_negative_weight=settings.reference_negative_weight,
        reference_loss_weight=settings.reference_loss_weight, pref_radii=settings.radii,
        ref_radii=settings.reference_radii, kernel=settings.kernel, aggregation=settings.aggregation,
    )
    return loss.mean()


def _optimizer_step(models: Models, optimizer: torch.optim.Optimizer, settings: UpdateSettings,
                    timer: SectionTimer) -> None:
    with timer("optimizer_step"):
        torch.nn.utils.clip_grad_norm_(models.params, settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def drpo_update(models: Models, optimizer: torch.optim.Optimizer, batches: Sequence[PromptBatch],
                settings: UpdateSettings, timer: SectionTimer) -> None:
    """One DrPO update over ``batches`` (one micro-step each); see the module docstring."""
    gen, s = models.generator, settings.drpo
    for batch in batches:
        k = batch.noise.shape[0]
        with timer("text_encode"):
            cond = gen.encode_prompts([batch.prompt])
        with timer("student_generate"):
            latents = gen.sample(cond, batch.noise)
        if settings.online_reference:
            with timer("reference_generate"):
                reference = gen.sample(cond, batch.noise, adapters=False)
        else:
            reference = batch.reference.to(gen.device)
        with timer("vae_decode"), torch.no_grad():
            images = gen.decode(latents.detach(), settings.decode_chunk)
        with timer("reward_score"):
            scores = models.reward.score(images, [batch.prompt] * k)
        with timer("rank_select"):
            positives, negatives = select_anchors(scores.view(1, k), s.num_pos, s.num_neg)
        with timer("features"):
            feats = models.features(latents.float(), cond=cond)
            with torch.no_grad():
                refs = models.features(reference.float(), cond=cond)
        with timer("loss"):
            loss = drpo_loss(feats, refs, positives[0].to(latents.device), negatives[0].to(latents.device), s)
        with timer("backward"):
            (loss / len(batches)).backward()
    _optimizer_step(models, optimizer, settings, timer)


def draft_update(models: Models, optimizer: torch.optim.Optimizer, batches: Sequence[PromptBatch],
                 settings: UpdateSettings, timer: SectionTimer) -> None:
    """One DRaFT update over ``batches`` (one micro-step each); see the module docstring."""
    gen, reward = models.generator, models.reward
    with reward_checkpointing(reward, settings.reward_checkpointing):
        for batch in batches:
            k = batch.noise.shape[0]
            with timer("text_encode"):
                cond = gen.encode_prompts([batch.prompt])
            for noise in batch.noise.split(settings.draft_chunk):
                with timer("student_generate"):
                    latents = gen.sample(cond, noise)
                if settings.online_reference:
                    with timer("reference_generate"):
                        gen.sample(cond, noise, adapters=False)
                with timer("vae_decode"):
                    images = gen.decode(latents, settings.decode_chunk)
                with timer("reward_score"):
                    scores = reward.score(images, [batch.prompt] * noise.shape[0], with_grad=True)
                with timer("loss"):
                    loss = -scores.sum() / (k * len(batches))
                with timer("backward"):
                    loss.backward()
    _optimizer_step(models, optimizer, settings, timer)


UPDATES: dict[str, Callable[..., None]] = {"drpo": drpo_update, "draft": draft_update}


def make_batches(generator: OneStepGenerator, prompts: Sequence[str], candidates: int,
                 noise: torch.Generator, *, with_reference: bool) -> list[PromptBatch]:
    """One PromptBatch per prompt: K noises on the generator's device and, for the bank protocol, the frozen
    base's latents for them (computed here, outside the timed update, as the reference bank does once)."""
    batches = []
    for prompt in prompts:
        z = torch.randn((candidates, *generator.latent_shape), generator=noise).to(generator.device)
        reference = (generator.sample(generator.encode_prompts([prompt]), z, adapters=False) if with_reference
                     else torch.empty(0))
        batches.append(PromptBatch(prompt=prompt, noise=z, reference=reference))
    return batches


def profile_updates(runs: Sequence[tuple[str, UpdateSettings]], models: Models, prompts: Sequence[str], *,
                    warmup: int = 1, updates: int = 3, seed: int = 0, deadline: float | None = None) -> pd.DataFrame:
    """Time ``warmup + updates`` updates of every (method, settings) run; returns the recorded ones.

    The runs take turns update by update (all runs' update i before any update i + 1), with the same prompts
    and noises, so that a change of machine load hits all of them alike. Prompts are cycled, ``accumulation``
    per update. Stops after the round in which ``time.monotonic()`` passes ``deadline`` (at least one round is
    recorded). Long format: run (index into runs), method, update, component (COMPONENTS and "update", the whole
    update), seconds, peak_memory_gb (CUDA only, NaN on CPU).
    """
    for method, _ in runs:
        if method not in UPDATES:
            raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if not prompts:
        raise ValueError("no prompts to profile with")
    device = models.generator.device
    cuda = device.type == "cuda"
    optimizers = [torch.optim.AdamW(models.params, lr=settings.learning_rate) for _, settings in runs]
    noises = [torch.Generator().manual_seed(seed) for _ in runs]
    rows = []
    for step in range(warmup + updates):
        for run, ((method, settings), optimizer, noise) in enumerate(zip(runs, optimizers, noises)):
            start = step * settings.accumulation
            chosen = [prompts[(start + i) % len(prompts)] for i in range(settings.accumulation)]
            with torch.no_grad():
                batches = make_batches(models.generator, chosen, settings.candidates, noise,
                                       with_reference=not settings.online_reference)
            timer = SectionTimer(device)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            timer.sync()
            began = time.perf_counter()
            UPDATES[method](models, optimizer, batches, settings, timer)
            timer.sync()
            total = time.perf_counter() - began
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
            if step >= warmup:
                record = {c: timer.seconds.get(c, 0.0) for c in COMPONENTS} | {"update": total}
                rows += [{"run": run, "method": method, "update": step - warmup, "component": c, "seconds": v,
                          "peak_memory_gb": peak} for c, v in record.items()]
        if step >= warmup and deadline is not None and time.monotonic() > deadline:
            break
    return pd.DataFrame.from_records(rows)


def summarize(timings: pd.DataFrame) -> pd.DataFrame:
    """Median, min, max seconds (and max peak memory) per run, method and component over the recorded updates."""
    grouped = timings.groupby(["run", "method", "component"], sort=False)
    summary = grouped["seconds"].agg(["median", "min", "max"]).rename(columns=lambda c: f"{c}_s")
    summary["updates"] = grouped["update"].nunique()
    summary["peak_memory_gb"] = grouped["peak_memory_gb"].max()
    return summary.reset_index()


class _LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages created inside the mode that are still alive, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self._seen:  # views share their base's storage
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._release, key, storage.nbytes())
        return out


def peak_memory(fn: Callable[[], Any], device: torch.device | str) -> tuple[Any, int]:
    """(fn(), peak bytes it allocated on top of what was live before).

    CUDA: the caching allocator's peak statistic. CPU: live tensor storages counted at the dispatcher (PyTorch
    keeps no CPU allocator statistics); allocator caching and fragmentation are not included.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - before
    with _LiveTensorBytes() as counter:
        out = fn()
    return out, counter.peak


def device_name(device: torch.device | str) -> str:
    """The accelerator's marketing name, or "cpu (N threads)"."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'s' if threads > 1 else ''})"
