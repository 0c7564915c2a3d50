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
| ``clip_image`` | -- | VAE-decoded image (a CLIP vision tower) | generator (VAE), checkpoint_path (CLIP folder) |
| ``raw_latent`` | 2.5e | latent | -- |

Each encoder lives in the module of its name (drpo.features.latent_mae, ...), except ``vit_mae``, ``dino`` and
``clip_image``, which share drpo.features.vit.

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
from drpo.features.vit import DINO_KEYS, VIT_MAE_KEYS, CLIPImageFeatures, DinoFeatures, ViTMAEFeatures
from drpo.generators import OneStepGenerator
from drpo.registry import check_arguments, lookup

FEATURE_ENCODERS: dict[str, type[FeatureEncoder]] = {
    "latent_mae": LatentMAEFeatures,
    "teacher_unet": TeacherUNetFeatures,
    "vit_mae": ViTMAEFeatures,
    "dino": DinoFeatures,
    "clip_image": CLIPImageFeatures,
    "raw_latent": RawLatentFeatures,
}


def build_feature_encoder(name: str, generator: OneStepGenerator | None = None, **kwargs: Any) -> FeatureEncoder:
    """Instantiate the encoder registered as `name` with `kwargs`; ValueError for unknown names.

    `generator` is passed to the encoders that need one (`needs_generator`; required there) and ignored by the
    others, so a caller can always pass it.
    """
    cls = lookup(FEATURE_ENCODERS, name, "feature encoder")
    if cls.needs_generator:
        if generator is None:
            raise ValueError(
                f"feature encoder {name!r} needs the generator: build_feature_encoder({name!r}, generator=...)"
            )
        kwargs["generator"] = generator
    return cls(**kwargs)


def features_arguments(spec: dict[str, Any], where: str = "models.features") -> dict[str, Any]:
    """The constructor arguments of a ``models.features`` config section: ``keys`` and ``options``, and a non-empty
    ``checkpoint`` as ``checkpoint_path``. ValueError naming the problem for an unknown encoder, an option it does
    not take, or a key whose map it can never have (the valid key grammar and map names in the message)."""
    cls = lookup(FEATURE_ENCODERS, spec["name"], "feature encoder", where)
    kwargs = {"keys": tuple(spec["keys"]), **spec["options"]}
    if spec.get("checkpoint"):
        kwargs["checkpoint_path"] = spec["checkpoint"]
    check_arguments(cls, kwargs, f"{where}: feature encoder {spec['name']!r}")
    impossible = cls.impossible_keys(kwargs["keys"])
    if impossible:
        raise ValueError(f"{where}.keys: feature encoder {spec['name']!r} has no map for {impossible}; its maps match "
                         f"{cls.map_pattern!r}, and keys are <map>, <map>_mean, <map>_std, <map>_flat, each with an "
                         "optional _<p> patch size")
    return kwargs


def build_features_from_config(spec: dict[str, Any], generator: OneStepGenerator, device: str) -> FeatureEncoder:
    """The encoder of a validated ``models.features`` config section (:func:`features_arguments`), on `device`."""
    return build_feature_encoder(spec["name"], generator=generator, **features_arguments(spec)).to(device)


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
    "CLIPImageFeatures",
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
