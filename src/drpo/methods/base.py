"""What every training method implements: turn one prompt's candidates into a loss."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class PromptBatch:
    """One micro-step of online training: one prompt and its K noises.

    noise, reference: (K, C, H, W); reference holds the frozen base generator's latents for the
    same noises (from the reference bank). metadata is the prompt's GenEval row when known.
    """

    prompt: str
    noise: torch.Tensor
    reference: torch.Tensor
    metadata: dict | None = None


class Method(ABC):
    """A training method on the shared loop (LoRA, optimizer, checkpoints are the loop's job).

    Subclasses set ``name`` and ``needs_reward_gradient`` and implement :meth:`loss`.
    """

    name: str = ""
    #: Methods that backpropagate through the reward refuse non-differentiable rewards.
    needs_reward_gradient: bool = False

    def __init__(self, generator, reward) -> None:
        if self.needs_reward_gradient and not getattr(reward, "differentiable", False):
            raise ValueError(
                f"method {self.name!r} needs reward gradients but reward {reward.name!r} is not "
                "differentiable; use a gradient-free method such as drpo"
            )
        self.generator = generator
        self.reward = reward

    @classmethod
    def from_config(cls, generator, reward, features, config: dict) -> "Method":
        """Build the method from the validated workflow config (its own section and ``train``)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Method state that must survive a resume (e.g. VGGFlow's adaptive clip threshold)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""

    @abstractmethod
    def loss(self, batch: PromptBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss for one prompt (gradient flows into the generator's LoRA) and log values."""
