"""Preference datasets for the offline methods (method spec section 7): DrPO from chosen / rejected images
instead of online reward ranking.

How a dataset reaches the methods:

1. ``read`` streams the rows of the authors' JSONL or of Pick-a-Pic v2's Parquet shards (errors name the file and
   row; ties skipped and counted).
2. ``cache`` encodes each row's images once with the generator's VAE into a folder beside the runs
   (rule preference_latents), incrementally and resumably, holding one chunk of rows in memory.
3. ``source``'s :class:`PreferenceSource` is the training source of a method whose class sets
   ``uses_preference_data``: the dataset's rows are its training prompts, with fresh noises and the frozen base's
   samples as for online training, and ``drpo.train.prompt_batches`` puts each row's chosen and rejected latents
   on the :class:`~drpo.methods.base.PromptBatch` (``chosen``, ``rejected``). Online methods never see them.
"""

from drpo.preferences.cache import ENCODINGS, LatentCache, build_latent_cache
from drpo.preferences.read import (
    FORMATS,
    PICKAPIC_COLUMNS,
    ImageRef,
    PreferenceRow,
    ReadStats,
    dataset_format,
    load_image,
    read_preferences,
)
from drpo.preferences.source import PreferenceSource

__all__ = [
    "ENCODINGS",
    "FORMATS",
    "PICKAPIC_COLUMNS",
    "ImageRef",
    "LatentCache",
    "PreferenceRow",
    "PreferenceSource",
    "ReadStats",
    "build_latent_cache",
    "dataset_format",
    "load_image",
    "read_preferences",
]
