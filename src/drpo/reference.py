"""Reference samples of the frozen base generator, computed once and reused.

Training (the reference drift of DrPO and the reference latents of the baselines) needs, for
every training prompt and every noise, the frozen base generator's output for the same noise.
The base never changes, so the workflow samples it once for a fixed bank of noises and training
cycles through the bank instead of running a second U-Net forward every step.

Noise is seeded per (run seed, prompt index, noise set): the bank is identical whatever the
number of processes or the batch composition (unlike a global RNG stream seeded with seed + rank).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm


def bank_noise(latent_shape: tuple[int, ...], candidates: int, *, seed: int, prompt_index: int,
               noise_set: int) -> torch.Tensor:
    """The K noises of one (prompt, noise set) cell of the bank: (K, *latent_shape), fp32."""
    state = np.random.SeedSequence((seed, prompt_index, noise_set)).generate_state(1)[0]
    generator = torch.Generator().manual_seed(int(state))
    return torch.randn((candidates, *latent_shape), generator=generator)


class ReferenceSource(Protocol):
    """Where training gets each micro-step's noises and the frozen base's latents for them."""

    prompts: list[str]
    noise_sets: int
    candidates: int

    def cell(self, prompt_index: int, noise_set: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise, base latents), each (K, C, H, W)."""


@dataclass
class ReferenceBank:
    """Noise and frozen-base latents for every training prompt.

    noise, latents: (num_prompts, noise_sets, K, C, H, W); latents are in U-Net space.
    """

    prompts: list[str]
    noise: torch.Tensor
    latents: torch.Tensor

    @property
    def noise_sets(self) -> int:
        return self.noise.shape[1]

    @property
    def candidates(self) -> int:
        return self.noise.shape[2]

    def cell(self, prompt_index: int, noise_set: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise, base latents) of one prompt and noise set, each (K, C, H, W)."""
        return self.noise[prompt_index, noise_set], self.latents[prompt_index, noise_set]

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"noise": self.noise.contiguous(), "latents": self.latents.contiguous()}, str(tmp),
                  metadata={"prompts": "\n".join(self.prompts)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "ReferenceBank":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            prompts = handle.metadata()["prompts"].split("\n")
        tensors = load_file(str(path))
        return cls(prompts=prompts, noise=tensors["noise"], latents=tensors["latents"])


@torch.no_grad()
def build_reference_bank(generator, prompts: list[str], *, candidates: int, noise_sets: int,
                         seed: int, batch_size: int) -> ReferenceBank:
    """Sample the frozen base generator (adapters off) for the bank's noises of every prompt."""
    shape = tuple(generator.latent_shape)
    noise = torch.stack([
        torch.stack([bank_noise(shape, candidates, seed=seed, prompt_index=p, noise_set=s)
                     for s in range(noise_sets)])
        for p in range(len(prompts))
    ])
    flat_noise = noise.flatten(0, 2)
    flat_prompts = [p for p in prompts for _ in range(noise_sets * candidates)]
    latents = []
    for start in tqdm(range(0, len(flat_prompts), batch_size), desc="reference bank", leave=False):
        cond = generator.encode_prompts(flat_prompts[start:start + batch_size])
        chunk = flat_noise[start:start + batch_size].to(generator.device, generator.dtype)
        latents.append(generator.sample(cond, chunk, adapters=False).float().cpu())
    return ReferenceBank(prompts=list(prompts), noise=noise, latents=torch.cat(latents).view_as(noise))


class OnlineReference:
    """The bank's noises, with the frozen base sampled on the fly (paper scale: a bank for 25k prompts
    would take tens of GB). Never cycles: every epoch draws new noises."""

    noise_sets = 2**31 - 1

    def __init__(self, generator, prompts: list[str], *, candidates: int, seed: int) -> None:
        self.generator, self.prompts, self.candidates, self.seed = generator, list(prompts), candidates, seed

    @torch.no_grad()
    def cell(self, prompt_index: int, noise_set: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = self.generator
        noise = bank_noise(tuple(gen.latent_shape), self.candidates, seed=self.seed,
                           prompt_index=prompt_index, noise_set=noise_set)
        cond = gen.encode_prompts([self.prompts[prompt_index]])
        return noise, gen.sample(cond, noise.to(gen.device, gen.dtype), adapters=False)
