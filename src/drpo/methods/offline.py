"""Offline DrPO, "offline" (method spec section 7): DrPO's objective with a preference dataset's images as its
anchors, and no reward model.

Per row of the dataset (a prompt, its chosen and rejected images, their VAE latents cached by drpo.preferences):
K fresh samples of the current generator for the prompt, with gradient, are the generated set; the features of
the chosen latents are the positive anchors and those of the rejected latents the negative anchors; the frozen
base's samples for the same noises feed the reference drift. The loss is online DrPO's own
(drpo.methods.drpo.drpo_loss with the drpo section's anchor weights, radii, kernel, aggregation, λ and latent L2),
so the two differ only in where the anchors come from. drpo.num_pos / num_neg do not apply (every chosen and
rejected image of the row is an anchor), and the pass/fail pools and reward-weighted objectives need rewards, so
they are refused.

The row's latents arrive as PromptBatch.chosen / rejected (drpo.preferences.PreferenceSource);
``uses_preference_data`` tells the workflow to give this method the dataset and the report to say so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from drpo.methods.base import Method, PromptBatch
from drpo.methods.drpo import DrPOSettings, drpo_loss


@dataclass(frozen=True)
class OfflineSettings:
    """Offline DrPO has no settings of its own: it reuses drpo's (``shared_settings``)."""


def binary_objective_problems(config: dict, method: str) -> list[str]:
    """Why ``config``'s drpo section cannot drive an offline DrPO mode (it needs the binary objective): [] if it can."""
    drpo = config["drpo"]
    problems = []
    if drpo["objective"] != "binary":
        problems.append(f"{method} uses DrPO's binary objective, but drpo.objective is {drpo['objective']!r}, "
                        "which weights candidates by their rewards; set drpo.objective: binary")
    if drpo["rollout_rounds"]:
        problems.append(f"{method} takes its anchors from a preference dataset, but drpo.rollout_rounds is "
                        f"{drpo['rollout_rounds']} (pass/fail pools of a reward); set it to 0")
    return problems


def candidates_and_data_features(method: Method, batch: PromptBatch):
    """What both offline DrPO modes start from: the prompt's K candidates of the current generator and their
    features, with gradient, and the detached features of the row's chosen and rejected latents.

    Returns (prompt, cond, latents, features, chosen_features, rejected_features): the prompt's conditioning once
    and repeated K times, latents (K, C, H, W), and feature dicts {key: (K | P | M, T, D)}.
    """
    gen, measure = method.generator, method.measure
    chosen, rejected = method.preference_pair(batch)
    k = batch.noise.shape[0]
    with measure("text_encode"):
        prompt = gen.encode_prompts([batch.prompt])
        cond = prompt.repeat_interleave(k)
    with measure("student_generate"):
        latents = gen.sample(cond, batch.noise.to(gen.device, gen.dtype))
    with measure("features"):
        features = method.features(latents.float(), cond=cond)
        with torch.no_grad():  # one call for both (GroupNorm cannot normalise a lone 1x1 map)
            data = method.features(torch.cat([chosen, rejected]), cond=prompt)
    chosen_features = {key: value[: len(chosen)] for key, value in data.items()}
    rejected_features = {key: value[len(chosen):] for key, value in data.items()}
    return prompt, cond, latents, features, chosen_features, rejected_features


class OfflineDrPO(Method):
    name = "offline"
    settings_class = OfflineSettings
    needs_reward_gradient = False
    uses_preference_data = True
    shared_settings = {"drpo": DrPOSettings}

    @classmethod
    def config_problems(cls, config: dict) -> list[str]:
        return binary_objective_problems(config, cls.name)

    def loss(self, batch: PromptBatch) -> tuple[torch.Tensor, dict[str, float]]:
        _, cond, latents, generated, positives, negatives = candidates_and_data_features(self, batch)
        loss = drpo_loss(self, self.shared["drpo"], latents, generated, batch.reference.to(latents.device), cond,
                         positives, negatives)
        return loss, {"chosen": float(len(batch.chosen)), "rejected": float(len(batch.rejected))}
