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
    """One micro-step of training: one prompt and its K noises.

    noise, reference: (K, C, H, W); reference holds the frozen base generator's latents for the
    same noises. metadata is the prompt's GenEval row when known. chosen (P, C, H, W) and rejected (M, C, H, W)
    are the VAE latents of a preference dataset row's images, for the methods that train from one
    (``Method.uses_preference_data``; drpo.preferences); None in online training.
    """

    prompt: str
    noise: torch.Tensor
    reference: torch.Tensor
    metadata: dict | None = None
    chosen: torch.Tensor | None = None
    rejected: torch.Tensor | None = None

    def split(self, size: int) -> list[PromptBatch]:
        """The same prompt with its candidates in groups of at most ``size`` (the data latents go with each)."""
        return [PromptBatch(self.prompt, noise, reference, self.metadata, self.chosen, self.rejected)
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
    #: Where the method's preferences come from: False, an online ranking of its own candidates by the reward;
    #: True, a preference dataset's chosen / rejected images (PromptBatch.chosen / rejected; drpo.preferences).
    #: The workflow gives these methods the dataset's latent cache and the report a "data" column.
    uses_preference_data: ClassVar[bool] = False
    #: Other methods' config sections whose settings this method reuses, by section name -> settings class (offline
    #: DrPO reuses drpo's weights, radii and lambda): built into ``self.shared[section]``, and part of its runs'
    #: settings, so that a change to them reruns its runs.
    shared_settings: ClassVar[dict[str, type]] = {}

    def __init__(self, generator, reward, settings, features=None, shared: dict | None = None) -> None:
        if self.needs_reward_gradient and not getattr(reward, "differentiable", False):
            raise ValueError(
                f"method {self.name!r} needs reward gradients but reward {reward.name!r} is not "
                "differentiable; use a gradient-free method such as drpo"
            )
        missing = sorted(set(self.shared_settings) - set(shared or {}))
        if missing:
            raise ValueError(f"method {self.name!r} reuses the settings of the sections {missing}; pass them as shared")
        self.generator = generator
        self.reward = reward
        self.settings = settings
        self.features = features
        self.shared = dict(shared or {})
        #: ``with self.measure(component): ...`` around each part of an update (COMPONENTS).
        self.measure: Measure = unmeasured

    @classmethod
    def from_config(cls, generator, reward, features, config: dict) -> Method:
        """Build the method from the validated workflow config (its own section ``config[name]``, and the sections
        of ``shared_settings``)."""
        settings = settings_from_section(cls.settings_class, config[cls.name])
        if not cls.shared_settings:  # (methods that take their own constructor arguments know nothing of shared)
            return cls(generator, reward, settings, features)
        shared = {section: settings_from_section(klass, config[section])
                  for section, klass in cls.shared_settings.items()}
        return cls(generator, reward, settings, features, shared=shared)

    @classmethod
    def config_problems(cls, config: dict) -> list[str]:
        """What in the validated config this method cannot train with, one message each (checked by drpo.config
        for every method in train.methods, before any job); [] when nothing."""
        return []

    def preference_pair(self, batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's chosen and rejected latents on the generator's device, or an error saying that this method
        trains from a preference dataset."""
        if batch.chosen is None or batch.rejected is None:
            raise ValueError(f"method {self.name!r} trains from a preference dataset, but the batch of prompt "
                             f"{batch.prompt!r} has no chosen / rejected latents; train it through the workflow, "
                             "which gives it preferences.path's latent cache (drpo.preferences.PreferenceSource)")
        device = self.generator.device
        return batch.chosen.to(device, torch.float32), batch.rejected.to(device, torch.float32)

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
