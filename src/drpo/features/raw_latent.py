"""The latent itself as feature map (spec 2.5e, the "Latent" ablation): `RawLatentFeatures`."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from drpo.features.base import FeatureEncoder
from drpo.generators import PromptEmbedding

RAW_LATENT_KEYS = (
    "latent",
    "latent_mean",
    "latent_std",
    "latent_mean_2",
    "latent_std_2",
    "latent_mean_4",
    "latent_std_4",
)
MAX_LATENT_TOKENS = 1024


class RawLatentFeatures(FeatureEncoder):
    """The latent itself as feature map "latent" (spec 2.5e, the "Latent" ablation).

    `spatial_stride` subsamples the positions of the raw "latent" key (4,096 tokens per 64x64 latent otherwise).
    Memory trap (spec 11 item 12): all tokens of a prompt's K samples form one point set, so the raw key at
    stride 1 on 64x64 latents makes a ~98k-point set for K = 24 and a distance matrix of tens of GiB. A call
    whose raw key has more than `max_latent_tokens` tokens per sample therefore raises a ValueError naming the
    smallest stride that fits; `max_latent_tokens=None` runs it anyway (the original's default behaviour).
    """

    map_pattern = "latent"

    def __init__(
        self,
        keys: Sequence[str] = RAW_LATENT_KEYS,
        spatial_stride: int = 1,
        chunk_size: int | None = None,
        max_latent_tokens: int | None = MAX_LATENT_TOKENS,
    ) -> None:
        super().__init__(keys, chunk_size, spatial_stride)
        if max_latent_tokens is not None and max_latent_tokens < 1:
            raise ValueError(f"RawLatentFeatures: max_latent_tokens must be >= 1 or None, got {max_latent_tokens}")
        self.max_latent_tokens = max_latent_tokens
        self._check_keys()

    @property
    def map_names(self) -> tuple[str, ...]:
        return ("latent",)

    def maps(self, x: Tensor) -> dict[str, Tensor]:
        return {"latent": x}

    def forward(self, latents: Tensor, cond: PromptEmbedding | None = None) -> dict[str, Tensor]:
        if latents.ndim == 4 and "latent" in self.keys and self.max_latent_tokens is not None:
            self._check_token_budget(*latents.shape)
        return super().forward(latents, cond)

    def _check_token_budget(self, n: int, c: int, h: int, w: int) -> None:
        def tokens(stride: int) -> int:
            return -(-h // stride) * -(-w // stride)

        stride = self.spatial_stride
        if tokens(stride) <= self.max_latent_tokens:
            return
        fits = next(s for s in range(stride + 1, max(h, w) + 1) if tokens(s) <= self.max_latent_tokens)
        points = n * tokens(stride)
        raise ValueError(
            f"raw_latent key 'latent' at spatial_stride {stride} gives {tokens(stride)} tokens per {h}x{w} latent: "
            f"the {n} samples of a prompt form a {points:,}-point set, and the drift's distance matrix has at "
            f"least {points:,}^2 entries ({points**2 * 4 / 2**30:.1f} GiB in fp32; spec 11 item 12). Use "
            f"spatial_stride >= {fits} (<= {self.max_latent_tokens} tokens per sample), or max_latent_tokens=None "
            "to run it anyway."
        )
