"""Looking up methods, rewards and feature encoders by name, and checking the arguments a config gives them.

The three registries (drpo.methods.METHODS, drpo.rewards.REWARDS, drpo.features.FEATURE_ENCODERS) map names to
classes; these helpers give every lookup and every argument check the same error, one that lists the valid
choices. drpo.config runs them when a config is read, so a wrong name fails before any job starts.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping


def lookup(registry: Mapping[str, type], name: str, what: str, where: str = "") -> type:
    """The class registered as ``name``; ValueError listing the valid names otherwise (prefixed by ``where``)."""
    if name not in registry:
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}unknown {what} {name!r}; valid names: {sorted(registry)}")
    return registry[name]


def constructor_arguments(cls: type) -> set[str]:
    """The keyword arguments ``cls(...)`` accepts, following ``**kwargs`` up to the base class that takes them."""
    accepted: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = list(inspect.signature(klass.__init__).parameters.values())[1:]  # without self
        accepted |= {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
    return accepted


def check_arguments(cls: type, arguments: Iterable[str], what: str) -> None:
    """ValueError naming every argument ``cls`` does not take, and the ones it does."""
    accepted = constructor_arguments(cls)
    foreign = sorted(set(arguments) - accepted)
    if foreign:
        raise ValueError(f"{what} takes no {', '.join(map(repr, foreign))}; it takes: {', '.join(sorted(accepted))}")
