"""GenEval worker (environment: envs/geneval.yaml; client: drpo.rewards.worker.GenEvalWorker).

Runs the official judge of djghosh13/geneval (`evaluation/evaluate_images.py` of a local clone): Mask2Former
Swin-S (mmdet 2.x) detection, CLIP ViT-L-14 colour classification, GenEval's rules. That script sets its models
and thresholds as globals in `__main__`; this worker imports it and sets the same globals, with local weights
and GenEval's defaults (confidence 0.3, 0.9 for counting, 16 objects per class, no NMS, position margin 0.1).
Score per image: 1.0 if GenEval judges it correct, else 0.0. Each image needs its GenEval metadata row. Both weights
files must hold exactly their model's tensors. Asked for details (the evaluation asks, training does not), the reply
carries GenEval's verdict per image as well: {"correct": bool, "reason": str}, the reason being GenEval's own text
(empty when correct); the image's tag is its metadata row's.
"""

import argparse
import importlib.util
import os
import tempfile
from pathlib import Path

from protocol import serve
from weights import check_weights

DETECTOR = "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco"


def detector_config(mmdet_dir: Path) -> Path:
    """mmdet 2.x's Mask2Former config: in a source checkout (configs/) or in the wheel (mmdet/.mim/configs/)."""
    for root in (mmdet_dir.parent / "configs", mmdet_dir / ".mim" / "configs"):
        if (root / "mask2former" / f"{DETECTOR}.py").is_file():
            return root / "mask2former" / f"{DETECTOR}.py"
    raise FileNotFoundError(f"no {DETECTOR}.py near {mmdet_dir}; pass --detector-config")


def load(args):
    os.environ["HF_HUB_OFFLINE"] = "1"
    import mmdet
    import open_clip
    import torch
    from mmdet.apis import init_detector

    evaluation = Path(args.geneval_dir) / "evaluation"
    spec = importlib.util.spec_from_file_location("geneval_evaluate_images", evaluation / "evaluate_images.py")
    geneval = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(geneval)

    config = args.detector_config or detector_config(Path(mmdet.__file__).parent)
    geneval.args = argparse.Namespace(options={})  # read by its ImageCrops (background colour, cropping)
    geneval.DEVICE = args.device
    # mmcv's loader (init_detector with a checkpoint) only logs mismatched keys; load here and check instead.
    geneval.object_detector = init_detector(str(config), None, device=args.device)
    checkpoint = torch.load(args.detector_checkpoint, map_location="cpu")
    state = {key[len("module."):] if key.startswith("module.") else key: value  # as mmcv strips a DDP prefix
             for key, value in checkpoint.get("state_dict", checkpoint).items()}
    check_weights(args.detector_checkpoint, *geneval.object_detector.load_state_dict(state, strict=False))
    # OpenAI's CLIP uses QuickGELU, which open_clip applies by itself only for pretrained="openai", not for a file.
    geneval.clip_model, _, geneval.transform = open_clip.create_model_and_transforms(
        "ViT-L-14", force_quick_gelu=True, device=args.device
    )
    check_weights(args.clip_checkpoint, *open_clip.load_checkpoint(geneval.clip_model, args.clip_checkpoint,
                                                                   strict=False))
    geneval.clip_model.eval()
    geneval.tokenizer = open_clip.get_tokenizer("ViT-L-14")
    geneval.classnames = (evaluation / "object_names.txt").read_text().split("\n")
    geneval.classnames = [name.strip() for name in geneval.classnames if name.strip()]
    geneval.THRESHOLD, geneval.COUNTING_THRESHOLD, geneval.MAX_OBJECTS = 0.3, 0.9, 16
    geneval.NMS_THRESHOLD, geneval.POSITION_THRESHOLD = 1.0, 0.1
    scratch = tempfile.TemporaryDirectory(prefix="geneval_worker_")

    def score(images, prompts, metadata):
        if metadata is None:
            raise ValueError("GenEval needs one metadata row (tag, include, exclude, prompt) per image")
        verdicts = []
        for i, (image, row) in enumerate(zip(images, metadata)):
            path = os.path.join(scratch.name, f"{i:05d}.png")  # GenEval's detector reads image files
            image.save(path)
            result = geneval.evaluate_image(path, row)
            verdicts.append({"correct": bool(result["correct"]), "reason": str(result.get("reason") or "")})
        return {"scores": [1.0 if verdict["correct"] else 0.0 for verdict in verdicts], "details": verdicts}

    return score


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--geneval-dir", required=True, help="local clone of djghosh13/geneval")
    parser.add_argument("--detector-checkpoint", required=True, help=f"{DETECTOR}.pth")
    parser.add_argument("--clip-checkpoint", required=True, help="open_clip ViT-L-14 'openai' weights file")
    parser.add_argument("--detector-config", default=None, help=f"{DETECTOR}.py (default: mmdet's own)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    serve(lambda: load(args), name="geneval", version="djghosh13/geneval evaluate_images.py")
