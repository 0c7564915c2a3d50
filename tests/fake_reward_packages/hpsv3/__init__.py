"""Fake hpsv3 1.0.0: HPSv3RewardInferencer loads its checkpoint strictly, as the real one does."""

import torch
from fake_tiny import TinyModel
from PIL import Image


class HPSv3RewardInferencer:
    def __init__(self, config_path=None, checkpoint_path=None, device="cuda", differentiable=False):
        self.model = TinyModel()
        self.model.load_state_dict(torch.load(checkpoint_path), strict=True)

    def reward(self, image_paths, prompts):
        return torch.tensor([[self.model.score_image(Image.open(path).convert("RGB")), 1.0] for path in image_paths])
