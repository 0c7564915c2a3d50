import torch
from fake_tiny import TinyModel


def init_detector(config, checkpoint=None, device="cuda:0"):
    model = TinyModel()
    if checkpoint is not None:  # mmcv's load_checkpoint: lenient, mismatches only logged
        model.load_state_dict(torch.load(checkpoint)["state_dict"], strict=False)
    return model
