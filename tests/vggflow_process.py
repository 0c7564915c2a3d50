"""One process of tests/test_baselines.py's two-process VGGFlow run (under torchrun): VGGFlow through the shared
loop, recording the reward-gradient norms of every micro-step; writes rank<r>.json with them and the final τ.

Usage: python -m torch.distributed.run --standalone --nproc-per-node=2 vggflow_process.py CONFIG.json OUT_DIR
"""

import json
import os
import sys
from pathlib import Path

import torch

from drpo.methods import build_method, vggflow
from drpo.pipeline import load_models
from drpo.reference import build_reference_bank
from drpo.train import TrainSettings, train

PROMPTS = ["a photo of a red circle", "a photo of a blue square", "a photo of two green triangles"]


def main(config_path: str, out: str) -> None:
    torch.set_num_threads(1)
    config = json.loads(Path(config_path).read_text())
    norms = []
    gradient = vggflow.reward_gradient

    def recorded(*args, **kwargs):  # the method's own function, its norms noted on the way
        scores, g = gradient(*args, **kwargs)
        norms.append(g.flatten(1).norm(dim=1).tolist())
        return scores, g

    vggflow.reward_gradient = recorded
    generator, reward, _ = load_models(config, features=False)
    method = build_method("vggflow", generator, reward, None, config)
    bank = build_reference_bank(generator, PROMPTS, candidates=config["train"]["candidates"], noise_sets=2, seed=0,
                                batch_size=8)
    train(method, bank, TrainSettings.from_config(config["train"], seed=0), Path(out) / "run",
          identity={"method": "vggflow"}, log=lambda *_: None)
    rank = int(os.environ["RANK"])
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"tau": method.clip_threshold, "norms": norms}))


if __name__ == "__main__":
    main(*sys.argv[1:])
