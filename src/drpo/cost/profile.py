"""Measured cost: per-component wall time of real training updates, on CPU or CUDA, with the paper's protocol.

What is timed is the training loop's own update (drpo.train.update) over the methods' own loss code: for the
duration of each update a :class:`SectionTimer` is the method's ``measure`` hook, so every component the method
and the loop mark (drpo.methods.base.COMPONENTS) is timed where it runs, and a change to a method reaches the
cost table. Protocol (spec section 6): the timer synchronises the device before and after each component
(``torch.cuda.synchronize`` on a GPU), component times are summed within an update, and the update time is the
synchronised wall time from the first micro-step to the end of the optimizer step. After ``warmup`` updates,
``updates`` updates are recorded; summaries give median, min and max over them. Several methods (e.g. DrPO and
DRaFT) take turns update by update, on the same prompts and noises, so that a change of load on a shared
machine affects all of them alike.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from drpo.methods.base import COMPONENTS, Method, unmeasured
from drpo.reference import ReferenceSource
from drpo.train import TrainSettings, grad_scaler, optimizer_for, prompt_batches, update


class SectionTimer:
    """Accumulates synchronised wall time per component: ``with timer("backward"): ...``.

    A section entered inside another counts toward the outer one only (e.g. DRaFT's decode and reward, run
    again by activation checkpointing inside the backward pass, are backward time), so components never
    overlap and their sum is at most the update's time.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)
        self._depth = 0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def __call__(self, component: str) -> Iterator[None]:
        if component not in COMPONENTS:
            raise ValueError(f"unknown component {component!r}; expected one of {COMPONENTS}")
        self._depth += 1
        outermost = self._depth == 1
        if outermost:
            self.sync()
            start = time.perf_counter()
        try:
            yield
        finally:
            self._depth -= 1
            if outermost:
                self.sync()
                self.seconds[component] += time.perf_counter() - start


def update_cells(step: int, accumulation: int, num_prompts: int) -> list[tuple[int, int]]:
    """(prompt index, noise set) of each micro-step of profiled update ``step``: the prompts are cycled and every
    update draws fresh noises (noise set = step), the same for every method."""
    return [((step * accumulation + i) % num_prompts, step) for i in range(accumulation)]


def profile_updates(methods: Sequence[Method], params: list[torch.nn.Parameter], source: ReferenceSource,
                    settings: TrainSettings, *, metadata: list[dict] | None = None, warmup: int, updates: int,
                    online_reference: bool, deadline: float | None = None) -> pd.DataFrame:
    """Time ``warmup + updates`` updates of every method; returns the recorded ones.

    The methods share the generator and its LoRA ``params`` (each has its own AdamW) and take turns update by
    update (all methods' update i before any update i + 1), on the same prompts and noises from ``source``;
    ``settings.prompts_per_step`` prompts per update. ``online_reference``: the frozen base is sampled inside the
    update, as the paper's profiler does; otherwise before the timer starts, as a reference bank would have it.
    Stops after the round in which ``time.monotonic()`` passes ``deadline`` (at least one round is recorded).
    Long format: run (index into methods), method, update, component (COMPONENTS and "update", the whole
    update), seconds, peak_memory_gb (CUDA only, NaN on CPU), loss (the update's mean micro-step loss).
    """
    if not methods:
        raise ValueError("no methods to profile")
    device = methods[0].generator.device
    cuda = device.type == "cuda"
    optimizers = [optimizer_for(params, settings) for _ in methods]
    scalers = [grad_scaler(settings, device) for _ in methods]
    rows = []
    for step in range(warmup + updates):
        cells = update_cells(step, settings.prompts_per_step, len(source.prompts))
        for run, (method, optimizer, scaler) in enumerate(zip(methods, optimizers, scalers)):
            timer = SectionTimer(device)
            batches = prompt_batches(source, cells, metadata, timer if online_reference else unmeasured)
            if not online_reference:
                batches = list(batches)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            method.measure = timer
            try:
                timer.sync()
                began = time.perf_counter()
                logs = update(method, batches, params, optimizer, scaler, settings)
                timer.sync()
                total = time.perf_counter() - began
            finally:
                method.measure = unmeasured
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
            if step >= warmup:
                record = {c: timer.seconds.get(c, 0.0) for c in COMPONENTS} | {"update": total}
                rows += [{"run": run, "method": method.name, "update": step - warmup, "component": c,
                          "seconds": v, "peak_memory_gb": peak, "loss": logs["loss"]} for c, v in record.items()]
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
