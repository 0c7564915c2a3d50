"""The miniature's SD-Turbo by distillation: a flow-matching teacher, then a one-step student regressed onto it.

SD-Turbo is itself a one-step student of a multi-step model (SD 2.1). This recipe builds the miniature's base
generator the same way, because a one-step generator trained from scratch on a CPU budget (the Drifting recipe
of drpo.miniature.generator) draws every shape as a blob, and a multi-step model learns sharp shapes from a
plain regression loss:

1. Teacher: a UNet of the student's architecture, trained by conditional flow matching on VAE latents of
   renders (x_t = (1 - t) x0 + t z, velocity target z - x0, timestep input 999 t). The prompt is replaced by the
   empty prompt with probability `text_dropout`, so that sampling can use classifier-free guidance.
2. Pairs: for `pairs_per_row` fresh noises per prompt, the teacher's guided ODE solution (Heun, `ode_steps`
   steps from t = 1 to 0). Noise z and solution x0 form a deterministic coupling.
3. Student: starts from the teacher's weights, samples with SD-Turbo's rule (one UNet call at t = 999 and the
   epsilon projection, drpo.generators.SDTurboGenerator.sample) and regresses (MSE in latent space) onto the
   teacher's solution for the same noise.

The defaults are the shipped generator's settings, chosen by `experiments/sweep_generator.py` on one H100 (4.2 min
for the whole build): against guidance 2 / lower learning rates and a deeper UNet (layers_per_block 2) on the same
budget, guidance 3 with teacher lr 2e-3 judged best (GenEval-lite overall 39 % vs 29 % and 25 %; the Drifting
recipe 4 %), 120 test prompts x 4 seeds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from torch import Tensor
from tqdm import tqdm

from drpo.generators import PromptEmbedding
from drpo.miniature.data import sample_rows, write_provenance
from drpo.miniature.generator import (
    build_untrained_generator,
    geneval_lite,
    judge_latents,
    save_generator,
    training_data,
)
from drpo.world.spec import WorldSpec


def _velocity(unet: UNet2DConditionModel, x: Tensor, t: Tensor, hidden: Tensor) -> Tensor:
    return unet(x, t * 999, encoder_hidden_states=hidden).sample


@torch.no_grad()
def solve_flow(
    unet: UNet2DConditionModel, noise: Tensor, hidden: Tensor, empty: Tensor, *, steps: int, guidance: float
) -> Tensor:
    """Teacher sample: Heun integration of the guided velocity field from x_1 = noise to x_0.

    hidden: (B, L, D) prompt embeddings; empty: (1, L, D) embedding of the empty prompt. Guided velocity
    v_empty + guidance (v_prompt - v_empty); guidance 1 is the plain conditional field.
    """
    b = noise.shape[0]
    both = torch.cat([hidden, empty.expand(b, -1, -1)])

    def field(x: Tensor, t: float) -> Tensor:
        v = _velocity(unet, torch.cat([x, x]), torch.full((2 * b,), t, device=x.device), both)
        v_prompt, v_empty = v.chunk(2)
        return v_empty + guidance * (v_prompt - v_empty)

    times = torch.linspace(1.0, 0.0, steps + 1).tolist()
    x = noise
    for t, t_next in zip(times[:-1], times[1:]):
        d = field(x, t)
        x_euler = x + (t_next - t) * d
        x = x_euler if t_next == 0.0 else x + (t_next - t) * 0.5 * (d + field(x_euler, t_next))
    return x


def _warmup_cosine(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first 5 % of `steps`, then cosine decay to zero (valid for any steps >= 1)."""
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * i / steps))
    )


def _fit(params: list[Tensor], loss_of_step, *, lr: float, steps: int, desc: str) -> tuple[float, float]:
    """`steps` AdamW updates on loss_of_step() (warm-up and cosine decay, gradients clipped at 1).

    Returns the last loss and the seconds taken.
    """
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    schedule = _warmup_cosine(optimizer, steps)
    clock = time.time()
    for _ in tqdm(range(steps), desc=desc, mininterval=30):
        loss = loss_of_step()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
    return loss.item(), round(time.time() - clock, 1)


def distill_generator(
    spec: WorldSpec,
    rows: Sequence[dict[str, Any]],
    *,
    autoencoder: str | Path,
    out_dir: str | Path,
    teacher_steps: int = 2145,
    student_steps: int = 1470,
    batch_size: int = 256,
    renders_per_row: int = 48,
    teacher_lr: float = 2e-3,
    student_lr: float = 5e-4,
    text_dropout: float = 0.1,
    guidance: float = 3.0,
    ode_steps: int = 12,
    pairs_per_row: int = 64,
    unet_channels: Sequence[int] = (32, 64, 96),
    layers_per_block: int = 1,
    text_hidden: int = 64,
    beta_end: float = 0.002,
    eval_rows: Sequence[dict[str, Any]] | None = None,
    eval_seeds: Sequence[int] = (0, 1, 2, 3),
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train the teacher, solve its ODE for fresh noises, regress the one-step student; write it to `out_dir`.

    autoencoder: folder of train_autoencoder (becomes vae/). Both phases: AdamW with warm-up and cosine decay,
    gradient clipping at 1, `batch_size` latents a step drawn from a fixed pool of `renders_per_row` renders
    (teacher) or `pairs_per_row` teacher pairs (student) per row. The teacher's samples of `eval_rows` (one noise
    each) are judged too (metrics "teacher_geneval_lite"), to tell a weak teacher from a weak student.
    """
    started = time.time()
    arguments = {k: v for k, v in locals().items() if k not in ("spec", "rows", "eval_rows", "started")}
    arguments |= {"spec": spec.to_dict(), "rows": len(rows), "eval_rows": len(eval_rows or [])}
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    noise_rng = torch.Generator(device).manual_seed(seed)
    generator = build_untrained_generator(spec, autoencoder, unet_channels=unet_channels,
                                          layers_per_block=layers_per_block, text_hidden=text_hidden,
                                          beta_end=beta_end, device=device)
    unet, text_encoder, tokenizer = generator.unet, generator.text_encoder, generator.tokenizer
    data, ids = training_data(generator, rows, spec, renders_per_row, seed)
    empty_ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                          return_tensors="pt").input_ids.to(device)
    params = [*unet.parameters(), *text_encoder.parameters()]
    metrics: dict[str, Any] = {"parameters_unet": sum(p.numel() for p in unet.parameters())}

    def teacher_loss() -> Tensor:
        index = torch.tensor(sample_rows(rows, batch_size, rng), device=device)
        x0 = data[index, torch.randint(renders_per_row, (batch_size,), device=device)]
        token_ids = torch.where((torch.rand(batch_size, 1, device=device) < text_dropout), empty_ids, ids[index])
        z = torch.randn_like(x0)
        t = torch.rand(batch_size, device=device)
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * z
        return (_velocity(unet, xt, t, text_encoder(token_ids)[0]) - (z - x0)).square().mean()

    unet.train()
    text_encoder.train()
    metrics["teacher_final_loss"], metrics["teacher_seconds"] = _fit(
        params, teacher_loss, lr=teacher_lr, steps=teacher_steps, desc="train teacher")
    unet.eval()
    text_encoder.eval()

    with torch.no_grad():
        empty = text_encoder(empty_ids)[0]
        clock = time.time()
        pair_rows = torch.arange(len(rows), device=device).repeat_interleave(pairs_per_row)
        noises = generator.make_noise(len(pair_rows), generator=noise_rng)
        targets = torch.cat([
            solve_flow(unet, z, text_encoder(ids[r])[0], empty, steps=ode_steps, guidance=guidance)
            for z, r in zip(noises.split(1024), pair_rows.split(1024))
        ])
        metrics["pairs_latent_rms"] = targets.square().mean().sqrt().item()  # about 1 (scaled VAE latents)
        metrics["pairs_seconds"] = round(time.time() - clock, 1)
        if eval_rows:
            eval_ids = tokenizer([row["prompt"] for row in eval_rows], padding="max_length",
                                 max_length=tokenizer.model_max_length, return_tensors="pt").input_ids.to(device)
            eval_noise = torch.randn((len(eval_rows), *generator.latent_shape),
                                     generator=torch.Generator().manual_seed(seed)).to(device)
            teacher_latents = solve_flow(unet, eval_noise, text_encoder(eval_ids)[0], empty, steps=ode_steps,
                                         guidance=guidance)
            metrics["teacher_geneval_lite"] = judge_latents(generator, teacher_latents, eval_rows, spec)
            tqdm.write(f"teacher: {metrics['teacher_geneval_lite']}")

    # The student continues from the teacher's weights, used as SD-Turbo at t = 999 (the teacher is not shipped).
    def student_loss() -> Tensor:
        pick = torch.randint(len(pair_rows), (batch_size,), device=device)
        latents = generator.sample(PromptEmbedding(text_encoder(ids[pair_rows[pick]])[0]), noises[pick])
        return (latents - targets[pick]).square().mean()

    unet.train()
    text_encoder.train()
    metrics["final_loss"], metrics["student_seconds"] = _fit(
        params, student_loss, lr=student_lr, steps=student_steps, desc="train student")
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    if eval_rows:
        metrics["geneval_lite"] = geneval_lite(generator, eval_rows, spec, eval_seeds)
    save_generator(generator, out_dir)
    write_provenance(out_dir, function="drpo.miniature.distill.distill_generator", arguments=arguments,
                     seed=seed, steps=teacher_steps + student_steps, started=started, metrics=metrics)
    return metrics
