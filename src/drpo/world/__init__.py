"""The miniature world: coloured shapes, a GenEval-style prompt grammar, a renderer and a procedural judge."""

from drpo.world.detect import Detection, detect, judge, judge_detections
from drpo.world.geneval import (
    evaluate_folder,
    iter_sample_folder,
    read_results_jsonl,
    summarize,
    write_results_jsonl,
    write_sample_folder,
)
from drpo.world.prompts import (
    TAGS,
    all_prompts,
    make_splits,
    read_metadata_jsonl,
    read_prompts,
    write_metadata_jsonl,
)
from drpo.world.render import CORRUPTIONS, corruption_kinds, render, render_negative
from drpo.world.spec import WorldSpec

__all__ = [
    "CORRUPTIONS",
    "TAGS",
    "Detection",
    "WorldSpec",
    "all_prompts",
    "corruption_kinds",
    "detect",
    "evaluate_folder",
    "iter_sample_folder",
    "judge",
    "judge_detections",
    "make_splits",
    "read_metadata_jsonl",
    "read_prompts",
    "read_results_jsonl",
    "render",
    "render_negative",
    "summarize",
    "write_metadata_jsonl",
    "write_results_jsonl",
    "write_sample_folder",
]
