"""Official HPSv3 worker (environment: envs/hpsv3.yaml; client: drpo.rewards.worker.HPSv3OfficialWorker).

The hpsv3 1.0.0 package on transformers 4.45, as the DrPO authors ran it: its HPSv3_7B.yaml copied with
model_name_or_path set to the local Qwen2-VL-7B-Instruct folder, the local HPSv3.safetensors, and the first
output column (the predicted mean) as the score. A cross-check of drpo.rewards.HPSv3Reward. Needs a CUDA device.
"""

import argparse
import os
import tempfile
from pathlib import Path

from protocol import serve
from weights import WeightsMismatch


def load(args):
    os.environ["HF_HUB_OFFLINE"] = "1"
    import hpsv3
    import torch
    import yaml

    if not args.device.startswith("cuda"):
        # Its reward head runs in fp32 on the bf16 model's hidden states, cast only by a CUDA autocast: on CPU
        # the first request would fail with "mat1 and mat2 must have the same dtype".
        raise RuntimeError(f"hpsv3 1.0.0 needs a CUDA device (got --device {args.device}): it casts its reward "
                           "head's input to fp32 only under CUDA autocast")
    config = yaml.safe_load((Path(hpsv3.__file__).parent / "config" / "HPSv3_7B.yaml").read_text())
    config["model_name_or_path"] = args.model
    scratch = tempfile.TemporaryDirectory(prefix="hpsv3_worker_")
    config_path = Path(scratch.name) / "HPSv3_7B.yaml"
    config_path.write_text(yaml.safe_dump(config))
    try:  # the package loads HPSv3.safetensors over the whole model strictly; the error just needs the file's name
        inferencer = hpsv3.HPSv3RewardInferencer(str(config_path), args.checkpoint, device=args.device)
    except RuntimeError as exc:
        if "Error(s) in loading state_dict" not in str(exc):
            raise
        raise WeightsMismatch(f"{args.checkpoint} is not HPSv3's weights file: {exc}") from exc

    @torch.no_grad()
    def score(images, prompts, metadata):
        paths = []
        for i, image in enumerate(images):
            paths.append(str(Path(scratch.name) / f"{i:05d}.png"))
            image.save(paths[-1])
        return [float(row[0]) for row in inferencer.reward(paths, prompts)]

    return score


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="local Qwen2-VL-7B-Instruct folder")
    parser.add_argument("--checkpoint", required=True, help="HPSv3.safetensors")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    serve(lambda: load(args), name="hpsv3_official", version="hpsv3 1.0.0")
