"""Fake mmdet 2.x: mmdet.apis.init_detector and inference_detector.

The fake detector sees one object per image quadrant whose colour is dominated by one channel: class 0 (the first
line of GenEval's object_names.txt) for red, 1 for green, 2 for blue, with confidence (that channel - the larger of
the other two) / 255. So a quadrant of (255, 0, 0) is a class-0 object of confidence 1.0, one of (200, 0, 0) one of
0.78: kept at GenEval's threshold 0.3, dropped at its counting threshold 0.9. Deterministic and weight-free: the
weights only face the worker's check.
"""

from pathlib import Path

import numpy as np
import torch
from fake_tiny import TinyModel
from PIL import Image

NUM_CLASSES = 3


def init_detector(config, checkpoint=None, device="cuda:0"):
    if not Path(config).is_file():  # mmcv's Config.fromfile
        raise FileNotFoundError(f"file {config} does not exist")
    model = TinyModel()
    if checkpoint is not None:  # mmcv's load_checkpoint: lenient, mismatches only logged
        model.load_state_dict(torch.load(checkpoint)["state_dict"], strict=False)
    return model


def inference_detector(model, image_path):
    """One (n, 5) array [x0, y0, x1, y1, confidence] per class, as mmdet 2.x's bbox results."""
    assert isinstance(model, TinyModel), "inference_detector needs the model of init_detector"
    pixels = np.asarray(Image.open(image_path).convert("RGB"), dtype=np.float64)
    height, width = pixels.shape[:2]
    boxes = [[] for _ in range(NUM_CLASSES)]
    for y0, y1 in ((0, height // 2), (height // 2, height)):
        for x0, x1 in ((0, width // 2), (width // 2, width)):
            mean = pixels[y0:y1, x0:x1].reshape(-1, 3).mean(axis=0)
            channel = int(mean.argmax())
            confidence = (mean[channel] - np.delete(mean, channel).max()) / 255
            if confidence > 0:
                boxes[channel].append([x0, y0, x1, y1, confidence])
    return [np.asarray(found, dtype=np.float32).reshape(-1, 5) for found in boxes]
