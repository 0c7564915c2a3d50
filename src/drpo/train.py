"""The training loop shared by every method: LoRA, AdamW, gradient accumulation, checkpoints, resume.

One optimizer update = ``prompts_per_step`` micro-steps of one prompt and K candidates each (the
paper's layout: batch of one prompt per process, gradient accumulation over prompts). :func:`update` is that
step, shared with the cost report, which times it through the method's ``measure`` hook.

Data order is a pure function of the update index (PromptSchedule): prompts are shuffled once with the
run seed and cycled, tag by tag when they carry GenEval tags and train.balance_tags is on; the noise set
of a prompt is its epoch modulo the bank's noise sets. Checkpoints hold the
LoRA (diffusers format), the optimizer state, the fp16 loss scale and the update index, so a killed run resumes from
its latest whole checkpoint with exactly the data and state it would have had. The run folder (drpo.run_folder)
is locked while a trainer writes it and belongs to one identity: other settings start afresh. ``train_done.json``
is written last; its presence means the run finished.

Precision as the authors' accelerate trainers have it: the generator's step runs under autocast (fp16 or bf16),
the feature encoder and the drift math in fp32, and fp16 scales the loss (:func:`grad_scaler`).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from drpo import run_folder
from drpo.config import checkpoint_steps, method_train
from drpo.lora import add_lora, load_lora, save_lora
from drpo.methods.base import Measure, Method, PromptBatch, unmeasured
from drpo.preferences.source import PreferenceSource
from drpo.reference import ReferenceSource


@dataclass(frozen=True)
class TrainSettings:
    """One run's settings, from the config's ``train`` section (config.yaml documents each)."""

    steps: int
    prompts_per_step: int
    candidates: int
    checkpoint_every: int
    learning_rate: float
    seed: int
    adam_betas: tuple[float, float]
    weight_decay: float
    adam_eps: float
    max_grad_norm: float
    mixed_precision: str
    balance_tags: bool
    lora: dict

    @classmethod
    def from_config(cls, train: dict, seed: int, method: str | None = None) -> "TrainSettings":
        """Settings of one run from the ``train`` section; with ``method``, as that method resolves it
        (``train.per_method[method]`` merged over it, drpo.config.method_train)."""
        if method is not None:
            train = method_train(train, method)
        keys = ("steps", "prompts_per_step", "candidates", "checkpoint_every", "learning_rate",
                "weight_decay", "adam_eps", "max_grad_norm", "mixed_precision", "lora", "balance_tags")
        return cls(seed=seed, adam_betas=tuple(train["adam_betas"]), **{k: train[k] for k in keys})


class PromptSchedule:
    """Which prompt and noise set each micro-step uses (a pure function of the micro-step index).

    Without tags, the prompts are shuffled once with the seed and cycled; the noise set is the epoch modulo
    the bank's noise sets. With one tag per prompt (GenEval metadata, as in the miniature), the micro-steps go
    round-robin over the tags (in a seeded order) and each tag cycles its own shuffled prompts, so that every
    tag gets an equal share of training, as GenEval's overall score weighs every tag equally (80 % of the
    miniature's grammar is color_attr); the noise set is then the prompt's epoch within its tag.
    """

    def __init__(self, num_prompts: int, noise_sets: int, seed: int, tags: Sequence[str] | None = None) -> None:
        if num_prompts == 0:
            raise ValueError("no training prompts")
        if tags is not None and len(tags) != num_prompts:
            raise ValueError(f"{len(tags)} tags for {num_prompts} prompts")
        rng = random.Random(seed)
        if tags is None:
            self.groups = [list(range(num_prompts))]
        else:
            self.groups = [[i for i, t in enumerate(tags) if t == tag] for tag in sorted(set(tags))]
            rng.shuffle(self.groups)
        for group in self.groups:
            rng.shuffle(group)
        self.noise_sets = noise_sets

    def __call__(self, micro_step: int) -> tuple[int, int]:
        turn, which = divmod(micro_step, len(self.groups))
        group = self.groups[which]
        epoch, position = divmod(turn, len(group))
        return group[position], epoch % self.noise_sets


def _autocast(device: str, mixed_precision: str):
    if mixed_precision == "no":
        return torch.autocast(device_type=device, enabled=False)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]
    return torch.autocast(device_type=device, dtype=dtype)


def optimizer_for(params: list[torch.nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
    """The paper's AdamW on the LoRA parameters."""
    return torch.optim.AdamW(params, lr=settings.learning_rate, betas=settings.adam_betas,
                             weight_decay=settings.weight_decay, eps=settings.adam_eps)


def grad_scaler(settings: TrainSettings, device: torch.device) -> torch.amp.GradScaler:
    """The loss scaler of fp16 training, as accelerate's fp16 mode has (small gradients would flush to zero in
    fp16 activations); under bf16 or fp32 a disabled scaler, which passes the loss and the step through unchanged.
    Its scale is training state, saved with each checkpoint."""
    return torch.amp.GradScaler(device.type, enabled=settings.mixed_precision == "fp16")


def prompt_batches(source: ReferenceSource, cells: Iterable[tuple[int, int]], metadata: list[dict] | None,
                   measure: Measure = unmeasured) -> Iterator[PromptBatch]:
    """The micro-batches of the given (prompt index, noise set) cells; drawing the noises and the frozen base's
    latents for them is the update's "reference_generate" component. A preference dataset's source
    (drpo.preferences.PreferenceSource) also gives each batch its row's chosen and rejected latents."""
    for prompt_index, noise_set in cells:
        with measure("reference_generate"):
            noise, reference = source.cell(prompt_index, noise_set)
        chosen, rejected = source.pair(prompt_index) if isinstance(source, PreferenceSource) else (None, None)
        yield PromptBatch(prompt=source.prompts[prompt_index], noise=noise, reference=reference,
                          metadata=metadata[prompt_index] if metadata else None, chosen=chosen, rejected=rejected)


# The loop stays hand-written rather than accelerate's Accelerator for now, because moving autocast, accumulation and
# the all-reduce there would change the checkpoint format, resume and the cost report's timed update at once, and
# that refactor has not yet been made and measured against this loop.
def update(method: Method, batches: Iterable[PromptBatch], params: list[torch.nn.Parameter],
           optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, settings: TrainSettings,
           world: int = 1) -> dict[str, float]:
    """One optimizer update: every micro-batch's loss and backward (each weighted 1 / prompts_per_step, the
    update's prompts over all processes, and scaled by ``scaler``), the gradient sum across processes, unscaling,
    clipping and the AdamW step (skipped by an fp16 scaler when a gradient overflowed).

    A method with ``candidates_per_backward`` set back-propagates each prompt's candidates in groups of that
    size, weighted by their share of K. Returns the logs averaged like the loss, and the gradient norm.
    """
    measure = method.measure
    device = method.generator.device
    logs: dict[str, float] = {}
    for batch in batches:
        k = batch.noise.shape[0]
        for part in batch.split(method.candidates_per_backward or k):
            share = len(part.noise) / k
            with _autocast(device.type, settings.mixed_precision):
                loss, part_logs = method.loss(part)
            with measure("backward"):
                scaler.scale(loss * share / settings.prompts_per_step).backward()
            for key, value in {"loss": loss.item(), **part_logs}.items():
                logs[key] = logs.get(key, 0.0) + value * share / settings.prompts_per_step
    if world > 1:
        _all_reduce_sum(params, logs, device)
    with measure("optimizer_step"):
        scaler.unscale_(optimizer)  # after the all-reduce, so that every process sees the same overflow
        grad_norm = torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    method.end_update()
    return logs | {"grad_norm": grad_norm.item()}


def _save_checkpoint(run_dir: Path, step: int, method: Method, optimizer, scaler, settings: TrainSettings) -> None:
    def write(folder: Path) -> None:
        save_lora(method.generator.unet, folder, kind=method.generator.kind,
                  metadata={"step": step, "seed": settings.seed})
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
        state = {"step": step, "seed": settings.seed, "method": method.name, "method_state": method.state_dict(),
                 "grad_scaler": scaler.state_dict()}  # {} unless fp16
        (folder / "training_state.json").write_text(json.dumps(state) + "\n")

    run_folder.save_checkpoint(run_dir, step, write)


def _resume(run_dir: Path, method: Method, optimizer, scaler, steps: int, log) -> int:
    """Load the newest whole checkpoint (warning about each damaged one skipped); its step, or 0."""
    for checkpoint in run_folder.checkpoints(run_dir):
        try:
            state, optimizer_state = run_folder.read_checkpoint(checkpoint)
            load_lora(method.generator.unet, checkpoint)
        except (OSError, ValueError) as error:
            log(f"warning: skipping checkpoint {checkpoint}, which is damaged ({error}); trying the one before")
            continue
        optimizer.load_state_dict(optimizer_state)
        if "method_state" in state:
            method.load_state_dict(state["method_state"])
        if state.get("grad_scaler"):
            scaler.load_state_dict(state["grad_scaler"])
        log(f"resuming from {checkpoint} (update {state['step']} of {steps})")
        return state["step"]
    return 0


def train(method: Method, source: ReferenceSource, settings: TrainSettings, run_dir: str | Path, *,
          identity: dict[str, Any], metadata: list[dict] | None = None,
          provenance: Callable[[Path], None] | None = None, log=print) -> Path:
    """Train ``method``'s generator on the source's prompts; resume from the latest whole checkpoint.

    ``identity`` is what the run folder belongs to (drpo.run_folder.claim): a folder holding a run of other
    settings is moved aside and training starts afresh. ``provenance(run_dir)`` writes the run's resolved
    config once the folder is claimed. The main process holds the folder's lock while training.

    Runs in every process of an ``accelerate launch`` (one process per GPU): each process takes an
    equal share of the update's prompts, LoRA gradients are summed across processes (they are a few
    MB, so a plain all-reduce replaces DDP), and every process calls the checkpoint save, which
    the main process writes. Returns the path of ``train_done.json``.
    """
    world, rank = _process_group(method.generator.device)
    main = rank == 0
    if settings.prompts_per_step % world:
        raise ValueError(f"train.prompts_per_step ({settings.prompts_per_step}) must be a multiple of the "
                         f"number of processes ({world})")
    run_dir = Path(run_dir)
    with run_folder.Lock(run_dir) if main else nullcontext():
        if main:
            run_folder.claim(run_dir, identity, log)
            run_folder.remove_temporaries(run_dir, log)
            if provenance is not None:
                provenance(run_dir)
        _barrier()  # no process looks for checkpoints before the folder is claimed
        return _train(method, source, settings, run_dir, metadata, world, rank, log)


def _train(method: Method, source: ReferenceSource, settings: TrainSettings, run_dir: Path,
           metadata: list[dict] | None, world: int, rank: int, log) -> Path:
    main = rank == 0
    local_prompts = settings.prompts_per_step // world
    generator = method.generator
    if source.candidates != settings.candidates:
        raise ValueError(f"reference source has K={source.candidates} noises per cell but "
                         f"train.candidates is {settings.candidates}; rebuild the reference bank")
    torch.manual_seed(settings.seed)  # LoRA initialisation; identical on every process
    params = add_lora(generator.unet, rank=settings.lora["rank"], alpha=settings.lora["alpha"],
                      dropout=settings.lora["dropout"], targets=tuple(settings.lora["targets"]))
    optimizer = optimizer_for(params, settings)
    scaler = grad_scaler(settings, generator.device)
    start = _resume(run_dir, method, optimizer, scaler, settings.steps, log)
    tags = [row.get("tag") for row in metadata] if metadata and settings.balance_tags else None
    schedule = PromptSchedule(len(source.prompts), source.noise_sets, settings.seed,
                              tags=tags if tags and None not in tags else None)
    if main:
        log(f"effective batch per update: {world} processes x {local_prompts} prompts x "
            f"K={settings.candidates} = {settings.prompts_per_step * settings.candidates} images")
    saves = set(checkpoint_steps(settings.steps, settings.checkpoint_every))
    metrics_path = run_dir / "metrics.jsonl"
    if main:
        _truncate_metrics(metrics_path, start)
    for step in tqdm(range(start + 1, settings.steps + 1), desc=f"train {method.name}",
                     initial=start, total=settings.steps, disable=not main):
        began = time.perf_counter()
        first = (step - 1) * settings.prompts_per_step + rank * local_prompts
        cells = (schedule(micro) for micro in range(first, first + local_prompts))
        logs = update(method, prompt_batches(source, cells, metadata, method.measure), params, optimizer, scaler,
                      settings, world)
        if main:
            record = {"step": step, **logs, "seconds": time.perf_counter() - began}
            with metrics_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        if step in saves:
            if main:
                _save_checkpoint(run_dir, step, method, optimizer, scaler, settings)
            _barrier()  # every process reaches the save; none runs ahead of it
    done = run_dir / "train_done.json"
    if main:
        done.write_text(json.dumps({"steps": settings.steps, "method": method.name,
                                    "seed": settings.seed, "processes": world}) + "\n")
    _barrier()
    return done


def _process_group(device) -> tuple[int, int]:
    """(world size, rank): joins the process group that `accelerate launch` / torchrun describe in the
    environment (NCCL on GPUs, gloo on CPUs), or runs alone."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if str(device).startswith("cuda") else "gloo")
    return (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _all_reduce_sum(params: list[torch.nn.Parameter], logs: dict[str, float], device) -> None:
    """Sum LoRA gradients and log values over processes (each already divided by the global count)."""
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
    keys = sorted(logs)
    values = torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    logs.update(zip(keys, values.tolist()))


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines after ``step`` (written by a run that died after its last checkpoint)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))
