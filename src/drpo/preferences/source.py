"""The training source of the offline methods: the dataset's rows as training prompts, each with its noises, the
frozen base's samples for them (any drpo.reference source over the rows' prompts) and its chosen and rejected
latents from the cache."""

from __future__ import annotations

import torch

from drpo.preferences.cache import LatentCache
from drpo.reference import ReferenceSource


class PreferenceSource:
    """A ReferenceSource over a cached dataset's rows that also serves each row's preference pair.

    Row i is training prompt i: the shared loop's schedule cycles over rows as over prompts, ``cell`` gives its
    noises and base latents (from ``reference``, built over ``cache.prompts``), ``pair`` its data latents.
    """

    def __init__(self, cache: LatentCache, reference: ReferenceSource) -> None:
        if list(reference.prompts) != cache.prompts:
            raise ValueError(f"the reference source's prompts are not the rows of the cache {cache.folder}")
        self.cache, self.reference = cache, reference
        self.prompts = cache.prompts

    @property
    def noise_sets(self) -> int:
        return self.reference.noise_sets

    @property
    def candidates(self) -> int:
        return self.reference.candidates

    def cell(self, prompt_index: int, noise_set: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise, base latents) of row ``prompt_index``, each (K, C, H, W)."""
        return self.reference.cell(prompt_index, noise_set)

    def pair(self, prompt_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen (P, C, H, W), rejected (M, C, H, W)) latents of row ``prompt_index``."""
        return self.cache.pair(prompt_index)
