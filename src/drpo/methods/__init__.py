"""Training methods by name. Adding a method = one module with a Method subclass + one line here.

The online methods rank their own candidates by the reward; offline, offline_distance and dpo_offline train from a
preference dataset instead (``Method.uses_preference_data``; drpo.preferences).
"""

from __future__ import annotations

from drpo.methods.base import Method, PromptBatch
from drpo.methods.dpo import DPO
from drpo.methods.dpo_offline import DPOOffline
from drpo.methods.draft import DRaFT
from drpo.methods.drpo import DrPO
from drpo.methods.grpo import GRPO
from drpo.methods.offline import OfflineDrPO
from drpo.methods.offline_distance import OfflineDistanceDrPO
from drpo.methods.pso import PSO
from drpo.methods.vggflow import VGGFlow
from drpo.registry import lookup

METHODS: dict[str, type[Method]] = {
    "drpo": DrPO,
    "draft": DRaFT,
    "vggflow": VGGFlow,
    "dpo": DPO,
    "grpo": GRPO,
    "pso": PSO,
    "offline": OfflineDrPO,
    "offline_distance": OfflineDistanceDrPO,
    "dpo_offline": DPOOffline,
}


def build_method(name: str, generator, reward, features, config: dict) -> Method:
    """Instantiate method ``name`` from the validated workflow config."""
    return lookup(METHODS, name, "method").from_config(generator, reward, features, config)


__all__ = ["METHODS", "Method", "PromptBatch", "build_method"]
