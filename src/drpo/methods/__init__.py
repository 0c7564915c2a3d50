"""Training methods by name. Adding a method = one module with a Method subclass + one line here."""

from __future__ import annotations

from drpo.methods.base import Method, PromptBatch
from drpo.methods.drpo import DrPO

METHODS: dict[str, type[Method]] = {
    "drpo": DrPO,
}


def build_method(name: str, generator, reward, features, config: dict) -> Method:
    """Instantiate method ``name`` from the validated workflow config."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name].from_config(generator, reward, features, config)


__all__ = ["METHODS", "Method", "PromptBatch", "build_method"]
