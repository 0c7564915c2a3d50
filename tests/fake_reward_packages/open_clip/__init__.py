"""Fake open_clip: the calls of hpsv2_worker.py and geneval_worker.py."""

import numpy as np
import torch
from fake_tiny import TinyModel


def create_model_and_transforms(name, pretrained=None, precision="fp32", device="cpu", force_quick_gelu=False):
    assert pretrained is None, "the workers load weights with load_checkpoint, then check them"
    return TinyModel(), None, lambda image: torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)


def load_checkpoint(model, checkpoint_path, strict=True):
    return model.load_state_dict(torch.load(checkpoint_path), strict=strict)


def get_tokenizer(name):
    return lambda prompts: torch.tensor([[len(prompt), 1.0, 2.0] for prompt in prompts])
