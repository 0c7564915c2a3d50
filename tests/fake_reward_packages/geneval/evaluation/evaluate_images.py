"""Fake GenEval evaluate_images.py: the worker sets its globals, then calls evaluate_image."""


def evaluate_image(filepath, metadata):
    return {"correct": object_detector.proj.weight.abs().sum().item() > 0}  # noqa: F821 - set by the worker
