"""What every training method implements (turn one prompt's candidates into a loss), and the components an
update is made of, which the cost report times through each method's ``measure`` hook."""

from __future__ import annotations

import contextlib
import dataclasses
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import ClassVar

import torch

#: The parts of an update, in the order they run. Methods and the shared update step (drpo.train) wrap each
#: part in ``self.measure(component)``; the cost report times them, and nothing else listens.
COMPONENTS = ("text_encode", "student_generate", "reference_generate", "vae_decode", "reward_score",
              "rank_select", "features", "loss", "backward", "optimizer_step")

Measure = Callable[[str], AbstractContextManager]


def unmeasured(component: str) -> AbstractContextManager:
    """The default ``measure`` hook: does nothing."""
    return contextlib.nullcontext()


@dataclass
class PromptBatch:
    """One micro-step of online training: one prompt and its K noises.

    noise, reference: (K, C, H, W); reference holds the frozen base generator's latents for the
    same noises. metadata is the prompt's GenEval row when known.
    """

    prompt: str
    noise: torch.Tensor
    reference: torch.Tensor
    metadata: dict | None = None

    def split(self, size: int) -> list[PromptBatch]:
        """The same prompt with its candidates in groups of at most ``size``."""
        return [PromptBatch(self.prompt, noise, reference, self.metadata)
                for noise, reference in zip(self.noise.split(size), self.reference.split(size))]


class Method(ABC):
    """A training method on the shared loop (LoRA, optimizer, checkpoints are the loop's job).

    A method module states ``name`` (its registry name and config section), the dataclass of that section
    (``settings_class``, fields without defaults: config.yaml holds them) and ``needs_reward_gradient``, and
    implements :meth:`loss`. ``features`` is the frozen feature encoder (used by DrPO; None is fine for others).
    """

    name: ClassVar[str] = ""
    settings_class: ClassVar[type]
    #: Methods that backpropagate through the reward refuse non-differentiable rewards.
    needs_reward_gradient: ClassVar[bool] = False

    def __init__(self, generator, reward, settings, features=None) -> None:
        if self.needs_reward_gradient and not getattr(reward, "differentiable", False):
            raise ValueError(
                f"method {self.name!r} needs reward gradients but reward {reward.name!r} is not "
                "differentiable; use a gradient-free method such as drpo"
            )
        self.generator = generator
        self.reward = reward
        self.settings = settings
        self.features = features
        #: ``with self.measure(component): ...`` around each part of an update (COMPONENTS).
        self.measure: Measure = unmeasured

    @classmethod
    def from_config(cls, generator, reward, features, config: dict) -> Method:
        """Build the method from the validated workflow config (its own section ``config[name]``)."""
        return cls(generator, reward, settings_from_section(cls.settings_class, config[cls.name]), features)

    def score_candidates(self, batch: PromptBatch, latents: torch.Tensor) -> torch.Tensor:
        """The reward of each of the prompt's candidate latents (K, C, H, W) -> (K,), decoded and scored without
        gradient: the ranking methods' use of the reward."""
        k = latents.shape[0]
        metadata = None if batch.metadata is None else [batch.metadata] * k
        with torch.no_grad():
            with self.measure("vae_decode"):
                images = self.generator.decode(latents.detach())
            with self.measure("reward_score"):
                return self.reward.score(images, [batch.prompt] * k, metadata=metadata)

    @property
    def candidates_per_backward(self) -> int | None:
        """Candidates of a prompt back-propagated together; None: all K. Only a method whose loss is a mean of
        independent per-candidate terms may split them (the gradient is the same, the memory smaller)."""
        return None

    def end_update(self) -> None:
        """Called by the shared loop after every optimizer step (e.g. VGGFlow refreshes its clip threshold)."""

    def state_dict(self) -> dict:
        """Method state that must survive a resume (e.g. VGGFlow's adaptive clip threshold)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""

    @abstractmethod
    def loss(self, batch: PromptBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss for one prompt (gradient flows into the generator's LoRA) and log values."""


def settings_from_section(settings_class: type, section: dict):
    """The settings dataclass of a config section: lists become tuples (settings are hashable), and a nested
    section whose field is typed with a dataclass becomes that dataclass."""
    types = typing.get_type_hints(settings_class)
    values = {}
    for key, value in section.items():
        if isinstance(value, dict) and dataclasses.is_dataclass(types.get(key)):
            value = settings_from_section(types[key], value)
        values[key] = tuple(value) if isinstance(value, list) else value
    return settings_class(**values)
