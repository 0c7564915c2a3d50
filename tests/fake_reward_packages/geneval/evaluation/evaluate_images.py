"""Fake GenEval evaluation/evaluate_images.py: the interface of djghosh13/geneval's, a judge of its own.

As in the real script, the models and thresholds are module globals that its __main__ sets; the GenEval worker
imports the file and sets them itself. `evaluate_image(filepath, metadata)` returns the real one's keys. The judge:
the fake detector's objects (mmdet.apis.inference_detector: one per quadrant dominated by a colour channel), kept
above THRESHOLD (COUNTING_THRESHOLD for the counting tag), at most MAX_OBJECTS per class; then every `include`
entry needs at least `count` objects of its class and every `exclude` entry fewer than `count`, with reasons in
GenEval's words. Colour and position are not judged.
"""

import json

import numpy as np
import torch
from mmdet.apis import inference_detector

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the real script asserts CUDA here


def evaluate_image(filepath, metadata):
    # Globals the worker must set (NameError otherwise), as the real script reads them.
    _ = (args.options, clip_model, transform, tokenizer, NMS_THRESHOLD, POSITION_THRESHOLD)  # noqa: F821
    boxes = inference_detector(object_detector, filepath)  # noqa: F821
    threshold = COUNTING_THRESHOLD if metadata["tag"] == "counting" else THRESHOLD  # noqa: F821
    detected = {}
    for index, classname in enumerate(classnames):  # noqa: F821
        kept = boxes[index][boxes[index][:, 4] > threshold]
        kept = kept[np.argsort(-kept[:, 4], kind="stable")][:MAX_OBJECTS]  # noqa: F821
        if len(kept):
            detected[classname] = kept
    reasons = []
    for entry in metadata.get("include", []):
        found = len(detected.get(entry["class"], ()))
        if found < entry["count"]:
            reasons.append(f"expected {entry['class']}>={entry['count']}, found {found}")
    for entry in metadata.get("exclude", []):
        found = len(detected.get(entry["class"], ()))
        if found >= entry["count"]:
            reasons.append(f"expected {entry['class']}<{entry['count']}, found {found}")
    return {"filename": filepath, "tag": metadata["tag"], "prompt": metadata["prompt"], "correct": not reasons,
            "reason": "\n".join(reasons), "metadata": json.dumps(metadata),
            "details": json.dumps({name: found[:, :4].tolist() for name, found in detected.items()})}
