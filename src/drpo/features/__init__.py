"""Frozen feature encoders phi: latents (N, C, H, W) -> dict of token sets key -> (N, T, D), looked up by name.

The drift field is computed in the feature space of a frozen encoder (spec 2.5). Every encoder implements
`FeatureEncoder` (drpo.features.base, with the feature-key grammar) and is registered by name in
`FEATURE_ENCODERS`; adding one is one module with a subclass that implements `maps()` plus one registry line.

| name | spec | input | needs |
|---|---|---|---|
| ``latent_mae`` | 2.5a | latent | checkpoint_path |
| ``teacher_unet`` | 2.5b | latent (+ noise) through the generator's frozen base U-Net | generator; cond at call time |
| ``vit_mae`` | 2.5c | VAE-decoded image | generator (VAE), checkpoint_path (HF folder) |
| ``dino`` | 2.5d | VAE-decoded image | generator (VAE), checkpoint_path (HF folder) |
| ``raw_latent`` | 2.5e | latent | -- |

Each encoder lives in the module of its name (drpo.features.latent_mae, ...), except ``vit_mae`` and ``dino``,
which share drpo.features.vit.

Encoders with ``needs_generator`` borrow the generator's modules (never registered as submodules, so they
are not moved, saved or frozen through the encoder); `build_feature_encoder(name, generator=...)` passes
the generator only to them. Encoders with ``needs_condition`` take the prompt conditioning at call time,
``features(latents, cond=generator.encode_prompts(...))``; the others ignore ``cond``, so a caller can
always pass it. `build_features_from_config` builds the encoder of a config's ``models.features`` section.
"""

from __future__ import annotations

from typing import Any

from drpo.features.base import STD_EPS, FeatureEncoder, feature_head, parse_feature_key
from drpo.features.latent_mae import (
    GN_EPS,
    SD_TURBO_MAE_KEYS,
    BasicBlock,
    LatentMAEEncoder,
    LatentMAEFeatures,
    gn_groups,
    save_checkpoint,
)
from drpo.features.raw_latent import MAX_LATENT_TOKENS, RAW_LATENT_KEYS, RawLatentFeatures
from drpo.features.teacher_unet import TEACHER_LAYERS, TeacherUNetFeatures, pool_flatten
from drpo.features.vit import DINO_KEYS, VIT_MAE_KEYS, DinoFeatures, ViTMAEFeatures
from drpo.generators import OneStepGenerator

FEATURE_ENCODERS: dict[str, type[FeatureEncoder]] = {
    "latent_mae": LatentMAEFeatures,
    "teacher_unet": TeacherUNetFeatures,
    "vit_mae": ViTMAEFeatures,
    "dino": DinoFeatures,
    "raw_latent": RawLatentFeatures,
}


def build_feature_encoder(name: str, generator: OneStepGenerator | None = None, **kwargs: Any) -> FeatureEncoder:
    """Instantiate the encoder registered as `name` with `kwargs`; ValueError for unknown names.

    `generator` is passed to the encoders that need one (`needs_generator`; required there) and ignored by the
    others, so a caller can always pass it.
    """
    if name not in FEATURE_ENCODERS:
        raise ValueError(f"unknown feature encoder {name!r}; valid names: {sorted(FEATURE_ENCODERS)}")
    cls = FEATURE_ENCODERS[name]
    if cls.needs_generator:
        if generator is None:
            raise ValueError(
                f"feature encoder {name!r} needs the generator: build_feature_encoder({name!r}, generator=...)"
            )
        kwargs["generator"] = generator
    return cls(**kwargs)


def build_features_from_config(spec: dict[str, Any], generator: OneStepGenerator, device: str) -> FeatureEncoder:
    """The encoder of a validated ``models.features`` config section, moved to `device`.

    ``name`` picks the registry entry; ``keys`` and ``options`` become constructor arguments, and a non-empty
    ``checkpoint`` becomes ``checkpoint_path``.
    """
    kwargs = {"keys": tuple(spec["keys"]), **spec["options"]}
    if spec.get("checkpoint"):
        kwargs["checkpoint_path"] = spec["checkpoint"]
    return build_feature_encoder(spec["name"], generator=generator, **kwargs).to(device)


__all__ = [
    "DINO_KEYS",
    "FEATURE_ENCODERS",
    "GN_EPS",
    "MAX_LATENT_TOKENS",
    "RAW_LATENT_KEYS",
    "SD_TURBO_MAE_KEYS",
    "STD_EPS",
    "TEACHER_LAYERS",
    "VIT_MAE_KEYS",
    "BasicBlock",
    "DinoFeatures",
    "FeatureEncoder",
    "LatentMAEEncoder",
    "LatentMAEFeatures",
    "RawLatentFeatures",
    "TeacherUNetFeatures",
    "ViTMAEFeatures",
    "build_feature_encoder",
    "build_features_from_config",
    "feature_head",
    "gn_groups",
    "parse_feature_key",
    "pool_flatten",
    "save_checkpoint",
]
