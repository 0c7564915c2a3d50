"""DPO-1step offline, "dpo_offline" (method spec sections 4 and 7): Diffusion-DPO's one-step logit with a preference
dataset's chosen and rejected latents in place of reward-ranked candidates: the offline methods' baseline.

Per row of the dataset: the K policy latents x_θ of fresh noises (with gradient) and the frozen base's latents for
the same noises; C = the row's chosen latents, R = its rejected latents (VAE-encoded images, drpo.preferences);
logit β[(sc(x_θ; C) − sc(x_θ; R)) − (sc(x_ref; C) − sc(x_ref; R))] (drpo.methods.dpo.dpo_logit, β from the dpo
section, which this method reuses) and loss −log σ(logit). No reward model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from drpo.methods.base import Method, PromptBatch
from drpo.methods.dpo import DPOSettings, dpo_logit


@dataclass(frozen=True)
class DPOOfflineSettings:
    """DPO-1step offline has no settings of its own: it reuses dpo's β (``shared_settings``)."""


class DPOOffline(Method):
    name = "dpo_offline"
    settings_class = DPOOfflineSettings
    needs_reward_gradient = False
    uses_preference_data = True
    shared_settings = {"dpo": DPOSettings}

    def loss(self, batch: PromptBatch) -> tuple[torch.Tensor, dict[str, float]]:
        gen, measure = self.generator, self.measure
        chosen, rejected = self.preference_pair(batch)
        with measure("text_encode"):
            cond = gen.encode_prompts([batch.prompt])
        with measure("student_generate"):
            latents = gen.sample(cond, batch.noise)
        reference = batch.reference.to(latents.device, latents.dtype)
        with measure("loss"):
            logit = dpo_logit(latents, reference, chosen, rejected, self.shared["dpo"].beta)
        return -F.logsigmoid(logit), {"dpo_logit": logit.item()}
