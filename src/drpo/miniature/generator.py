"""The miniature's SD-Turbo by Drifting from scratch (recipe "drifting"), and the parts both recipes share.

The shipped base generator uses recipe "distillation" (drpo.miniature.distill): on a budget of minutes this
Drifting recipe learns colours and rough layouts but draws every shape as a blob (GenEval-lite overall about 4 %
against distillation's 39 % on the same GPU budget, experiments/sweep_generator.py). It stays as the alternative
recipe and as the place of the shared helpers
(`build_untrained_generator`, `training_data`, `save_generator`, `geneval_lite`).

The result is a StableDiffusionPipeline folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/,
model_index.json) that drpo.generators.load_generator(path, "sd-turbo") reads and samples with SD-Turbo's rule:
one UNet call at t = 999 and the epsilon projection x = sqrt(a_0) (z - sqrt(1 - a_T) eps) / sqrt(a_T) +
sqrt(1 - a_0) eps. Training goes through that very sampler (drpo.generators.SDTurboGenerator.sample).

Schedule (a config choice, not a code path): SD-2.x's scaled-linear betas end at 0.012, which gives
sqrt(a_999) = 0.068, so the projection amplifies any error of the predicted eps by sqrt(1 - a_T) / sqrt(a_T)
= 14.6: the UNet must reproduce its input noise to about 1 % before a clean image appears, which is out of
reach for a 2M-parameter UNet trained for minutes on a CPU (even at 1.7 the noise takes hundreds of steps to
cancel). The miniature's scheduler therefore keeps SD's beta_start and scaled-linear shape but ends at
`beta_end` = 0.002 (sqrt(a_999) = 0.50, amplification 1.7).

Training (Drifting, spec sections 1 and 2.6): for each of `prompts_per_step` prompts, K samples from fresh noise
(with grad) and P VAE latents of renders of that prompt (the data) are embedded by frozen encoders; per feature
the field drift_loss(generated, positives, no negatives) attracts samples to the data and repels them from each
other, and the generator regresses onto sg(phi(x) + V). Features (see `_clouds`): the raw latent and the
latent-MAE stage maps with each location its own point cloud (a location is only compared with the same location
of other samples, which keeps objects in place and backgrounds uniform), bags of latent patches (local shape
statistics wherever an object is), global mean/std tokens, and the whole latent as one token. A small one-to-one
matching term (each sample regressed onto its greedily matched render, weight `match_weight`) gives a direct
signal for cancelling the input noise early in training. UNet (no attention at full latent resolution, for CPU
cost) and text encoder are trained jointly from scratch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
from torch import Tensor
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from drpo.drift import drift_loss
from drpo.evaluate import sample_latents
from drpo.features.latent_mae import LatentMAEFeatures
from drpo.generators import PromptEmbedding, SDTurboGenerator
from drpo.images import to_uint8
from drpo.miniature.autoencoder import encode, load_autoencoder
from drpo.miniature.data import max_prompt_tokens, render_pool, sample_rows, to_float, vocabulary, write_provenance
from drpo.miniature.mae import CHECKPOINT_NAME
from drpo.tiny import build_clip_tokenizer, tiny_text_config, tiny_unet_config, turbo_scheduler_config, write_pipeline_folder
from drpo.world.detect import judge_by_tag
from drpo.world.prompts import TAGS
from drpo.world.spec import WorldSpec

DEFAULT_MAE_MAPS = ("layer2", "layer3", "layer4")


def _tokens_by_location(features: Tensor, groups: int) -> Tensor:
    """(G*K, T, D) tokens of G prompts x K samples -> (G*T, K, D): one point cloud per prompt and location."""
    n, t, d = features.shape
    return features.view(groups, n // groups, t, d).transpose(1, 2).reshape(groups * t, n // groups, d)


def _bag(features: Tensor, groups: int) -> Tensor:
    """(G*K, T, D) tokens of G prompts x K samples -> (G, K*T, D): all tokens of a prompt's samples in one cloud."""
    return features.reshape(groups, -1, features.shape[-1])


def _clouds(
    latents: Tensor, mae: LatentMAEFeatures, groups: int, patches: Sequence[int], bag_maps: Sequence[str]
) -> dict[str, Tensor]:
    """Feature point clouds of latents (G*K, C, H, W) of G prompts: key -> (B, n, D), B = G or G x locations.

    Raw latent: "latent" (each position), "latent_p{p}" (non-overlapping p x p patches flattened, C p^2 dims),
    both one cloud per prompt and location, which keeps objects where the data put them; "bag_latent_p{p}" (the
    same patches of all positions in one cloud per prompt: local shape statistics wherever the object is, which
    sharpens edges and corners); "latent_all" (the whole latent as one token: joint structure). MAE maps
    (`mae.keys`): spatial maps per location, mean/std tokens per prompt, and the maps in `bag_maps` also as bags.
    """
    clouds = {"latent_all": latents.flatten(1).view(groups, -1, latents[0].numel())}
    clouds["latent"] = _tokens_by_location(latents.flatten(2).transpose(1, 2), groups)
    for p in patches:
        tokens = F.unfold(latents, p, stride=p).transpose(1, 2)
        clouds[f"latent_p{p}"] = _tokens_by_location(tokens, groups)
        clouds[f"bag_latent_p{p}"] = _bag(tokens, groups)
    for key, value in mae(latents).items():
        if value.shape[1] == 1:
            clouds[key] = _bag(value, groups)
            continue
        clouds[key] = _tokens_by_location(value, groups)
        if key in bag_maps:
            clouds[f"bag_{key}"] = _bag(value, groups)
    return clouds


def greedy_match(cost: Tensor) -> Tensor:
    """One-to-one assignment by repeatedly taking the cheapest free pair: cost (B, K, P), K <= P -> (B, K) indices."""
    cost = cost.detach().clone()
    b, k, _ = cost.shape
    rows = torch.arange(b, device=cost.device)
    match = torch.empty(b, k, dtype=torch.long, device=cost.device)
    for _ in range(k):
        flat = cost.flatten(1).argmin(dim=1)
        i, j = flat // cost.shape[2], flat % cost.shape[2]
        match[rows, i] = j
        cost[rows, i, :] = float("inf")
        cost[rows, :, j] = float("inf")
    return match


def build_untrained_generator(
    spec: WorldSpec,
    autoencoder: str | Path,
    *,
    unet_channels: Sequence[int],
    layers_per_block: int,
    text_hidden: int,
    beta_end: float,
    device: str,
) -> SDTurboGenerator:
    """A randomly initialised SD-Turbo-kind generator around the trained VAE (UNet and text encoder trainable).

    Its scheduler ends at `beta_end` (module docstring) and its tokenizer holds the world's vocabulary.
    """
    vae = load_autoencoder(autoencoder).to(device)
    tokenizer = build_clip_tokenizer(vocabulary(spec), model_max_length=max_prompt_tokens(spec))
    text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_text_config(tokenizer, hidden_size=text_hidden, num_layers=2)))
    latent_size = vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1)
    config = tiny_unet_config(
        sample_size=latent_size,
        latent_channels=vae.config.latent_channels,
        block_out_channels=unet_channels,
        cross_attention_dim=text_hidden,
        layers_per_block=layers_per_block,
        attention_heads=4,
    )
    # No attention at full latent resolution (256 tokens): it would dominate the CPU cost; the text still
    # enters at the lower resolutions and in the mid block.
    config["down_block_types"][0] = "DownBlock2D"
    config["up_block_types"][-1] = "UpBlock2D"
    unet = UNet2DConditionModel(**config).to(device)
    scheduler = EulerDiscreteScheduler(**turbo_scheduler_config() | {"beta_end": beta_end})
    return SDTurboGenerator(unet, vae, text_encoder.to(device), tokenizer, scheduler,
                            device=torch.device(device), dtype=torch.float32)


def save_generator(generator: SDTurboGenerator, out_dir: str | Path) -> None:
    """Write the generator as a StableDiffusionPipeline folder (weights on the CPU)."""
    write_pipeline_folder(out_dir, kind="sd-turbo", unet=generator.unet.cpu(), vae=generator.vae.cpu(),
                          text_encoder=generator.text_encoder.cpu(), tokenizer=generator.tokenizer,
                          scheduler=generator.scheduler)


def training_data(
    generator: SDTurboGenerator, rows: Sequence[dict[str, Any]], spec: WorldSpec, renders_per_row: int, seed: int
) -> tuple[Tensor, Tensor]:
    """VAE latents of `renders_per_row` renders per row (rows, renders, C, h, w) and the rows' token ids."""
    images = to_float(render_pool(rows, renders_per_row, spec, seed).flatten(0, 1)).to(generator.device)
    data = encode(generator.vae, images)
    ids = generator.tokenizer(
        [row["prompt"] for row in rows], padding="max_length", max_length=generator.tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids.to(generator.device)
    return data.view(len(rows), renders_per_row, *data.shape[1:]), ids


def mae_keys(maps: Sequence[str]) -> list[str]:
    """Per-location tokens plus global mean and std of every MAE map."""
    return [k for m in maps for k in (m, f"{m}_mean", f"{m}_std")]


@torch.no_grad()
def judge_latents(
    generator: SDTurboGenerator, latents: Tensor, rows: Sequence[dict[str, Any]], spec: WorldSpec
) -> dict[str, float]:
    """Accuracy of the detector's judge per tag and overall (mean of the tags present); one row per latent."""
    verdicts = judge_by_tag(to_uint8(generator.decode(latents)).numpy(), list(rows), spec)
    result = {tag: verdicts[tag]["correct"] for tag in TAGS if tag in verdicts}
    result["overall"] = float(np.mean(list(result.values())))
    return result


@torch.no_grad()
def geneval_lite(
    generator: SDTurboGenerator, rows: Sequence[dict[str, Any]], spec: WorldSpec, seeds: Sequence[int] = (0, 1, 2, 3)
) -> dict[str, float]:
    """GenEval-lite (`judge_latents`) of the generator on rows x seeds.

    Noise per image as in drpo.evaluate (seed * 1e6 + prompt index).
    """
    latents = sample_latents(generator, [row["prompt"] for row in rows], list(seeds), batch_size=256)
    return judge_latents(generator, latents, [row for row in rows for _ in seeds], spec)


def train_generator(
    spec: WorldSpec,
    rows: Sequence[dict[str, Any]],
    *,
    autoencoder: str | Path,
    mae: str | Path,
    out_dir: str | Path,
    steps: int = 1800,
    prompts_per_step: int = 4,
    samples_per_prompt: int = 16,
    positives_per_prompt: int = 16,
    renders_per_row: int = 48,
    lr: float = 1e-3,
    unet_channels: Sequence[int] = (32, 64, 96),
    layers_per_block: int = 1,
    text_hidden: int = 64,
    beta_end: float = 0.002,
    mae_maps: Sequence[str] = DEFAULT_MAE_MAPS,
    latent_patches: Sequence[int] = (4,),
    bag_maps: Sequence[str] = (),
    joint_weight: float = 4.0,
    match_weight: float = 5.0,
    radii: Sequence[float] = (0.02, 0.05, 0.2),
    eval_rows: Sequence[dict[str, Any]] | None = None,
    eval_every: int = 0,
    eval_seeds: Sequence[int] = (0, 1, 2, 3),
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train UNet and text encoder jointly by Drifting on renders of `rows`; write the SD-Turbo folder to `out_dir`.

    autoencoder: folder of train_autoencoder (becomes vae/); mae: folder of train_mae (frozen feature encoder).
    The data are a fixed pool of `renders_per_row` renders per row, VAE-encoded once. Loss per step: the sum
    over feature keys of the drift losses (the whole-latent key weighted `joint_weight`) plus `match_weight` x
    the MSE of each sample to its matched render (needs samples_per_prompt <= positives_per_prompt).
    AdamW with one-cycle cosine decay, gradient clipping at 1. If `eval_rows` are given, GenEval-lite (detector
    judge on eval_rows x eval_seeds) is measured every `eval_every` steps (0: only at the end) and logged in
    the metrics' "history".
    """
    if match_weight > 0 and samples_per_prompt > positives_per_prompt:
        raise ValueError(
            f"match_weight > 0 matches every sample to its own render: samples_per_prompt ({samples_per_prompt}) "
            f"must not exceed positives_per_prompt ({positives_per_prompt})"
        )
    if positives_per_prompt > renders_per_row:
        raise ValueError(f"positives_per_prompt ({positives_per_prompt}) exceeds renders_per_row ({renders_per_row}): "
                         "positives are drawn without replacement from each row's render pool")
    started = time.time()
    arguments = {k: v for k, v in locals().items() if k not in ("spec", "rows", "eval_rows", "started")}
    arguments |= {"spec": spec.to_dict(), "rows": len(rows), "eval_rows": len(eval_rows or [])}
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pick_rng = torch.Generator().manual_seed(seed)
    noise_rng = torch.Generator(device).manual_seed(seed)

    generator = build_untrained_generator(spec, autoencoder, unet_channels=unet_channels,
                                          layers_per_block=layers_per_block, text_hidden=text_hidden,
                                          beta_end=beta_end, device=device)
    unet, text_encoder, tokenizer = generator.unet, generator.text_encoder, generator.tokenizer
    mae_features = LatentMAEFeatures(Path(mae) / CHECKPOINT_NAME, keys=mae_keys(mae_maps), block_stride=0).to(device)
    data, ids = training_data(generator, rows, spec, renders_per_row, seed)

    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    history: list[dict[str, Any]] = []
    g, k, p = prompts_per_step, samples_per_prompt, positives_per_prompt
    clock = time.time()
    for step in tqdm(range(1, steps + 1), desc="train generator", mininterval=30):
        unet.train()
        text_encoder.train()
        index = sample_rows(rows, g, rng)
        hidden = text_encoder(ids[index])[0].repeat_interleave(k, dim=0)
        latents = generator.sample(PromptEmbedding(hidden), generator.make_noise(g * k, generator=noise_rng))
        pick = torch.stack([torch.randperm(renders_per_row, generator=pick_rng)[:p] for _ in index])
        positives = data[torch.tensor(index, device=device)[:, None], pick.to(device)].flatten(0, 1)
        with torch.no_grad():
            target = _clouds(positives, mae_features, g, latent_patches, bag_maps)
        clouds = _clouds(latents, mae_features, g, latent_patches, bag_maps)
        loss = sum(
            (joint_weight if key == "latent_all" else 1.0)
            * drift_loss(x, target[key], x[:, :0], positive_weight=1.0, negative_weight=1.0, radii=radii,
                         kernel="laplacian")[0].mean()
            for key, x in clouds.items()
        )
        if match_weight > 0:
            gen, pos = latents.reshape(g, k, -1), positives.reshape(g, p, -1)
            matched = pos.gather(1, greedy_match(torch.cdist(gen, pos))[..., None].expand(-1, -1, gen.shape[-1]))
            loss = loss + match_weight * (gen - matched).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if eval_rows and eval_every and step % eval_every == 0 and step < steps:
            unet.eval()
            text_encoder.eval()
            history.append({"step": step, "loss": loss.item(), "seconds": round(time.time() - started, 1)}
                           | geneval_lite(generator, eval_rows, spec, eval_seeds))
            tqdm.write(f"generator step {step}: {history[-1]}")

    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    metrics: dict[str, Any] = {"final_loss": loss.item(), "train_seconds": round(time.time() - clock, 1),
                               "parameters_unet": sum(p.numel() for p in unet.parameters())}
    if eval_rows:
        metrics["geneval_lite"] = geneval_lite(generator, eval_rows, spec, eval_seeds)
        history.append({"step": steps, "loss": loss.item(), "seconds": round(time.time() - started, 1)}
                       | metrics["geneval_lite"])
        metrics["history"] = history
    save_generator(generator, out_dir)
    write_provenance(out_dir, function="drpo.miniature.generator.train_generator", arguments=arguments,
                     seed=seed, steps=steps, started=started, metrics=metrics)
    return metrics
