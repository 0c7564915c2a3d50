"""Train one method on a single prompt and judge that prompt on fresh noises before and after.

A diagnostic for "can this method, reward and λ move the generator at all?": it removes prompt-to-prompt
transfer from the question. Training draws fresh noises every micro-step (online reference, no bank); the
judgement uses 128 other noises, with the GenEval-lite detector and the training reward.

    python experiments/overfit_prompt.py --prompt-index 0 --steps 150 \
        --set models.reward='{name: geneval_lite, path: null}' --set drpo.reference_loss_weight=0.0

`--set section.key=value` (a YAML value; a mapping replaces the old one whole) sets a key of the resolved
config of the default run (results/runs/drpo/seed0/config.resolved.yaml), so run `make run` first.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import yaml

from drpo.methods import build_method
from drpo.pipeline import load_models
from drpo.prompt_files import read_rows
from drpo.reference import OnlineReference
from drpo.rewards import GenEvalLiteReward
from drpo.train import TrainSettings, train


@torch.no_grad()
def judge(generator, reward, row: dict, noises: int = 128) -> dict[str, float]:
    noise = torch.randn(noises, *generator.latent_shape, generator=torch.Generator().manual_seed(123))
    cond = generator.encode_prompts([row["prompt"]]).repeat_interleave(noises)
    images = generator.decode(generator.sample(cond, noise.to(generator.device)))
    prompts, rows = [row["prompt"]] * noises, [row] * noises
    return {"geneval_lite": GenEvalLiteReward().score(images, prompts, metadata=rows).mean().item(),
            "reward": reward.score(images, prompts, metadata=rows).mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="results/runs/drpo/seed0/config.resolved.yaml")
    parser.add_argument("--prompts", default="results/world/train_metadata.jsonl")
    parser.add_argument("--prompt-index", type=int, default=0)
    parser.add_argument("--method", default="drpo")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()

    config = yaml.safe_load(Path(args.config).read_text())
    for item in args.set:
        path, _, value = item.partition("=")
        _set(config, path, yaml.safe_load(value))
    config["train"].update(steps=args.steps, checkpoint_every=args.steps, balance_tags=False)
    row = read_rows(args.prompts)[args.prompt_index]
    generator, reward, features = load_models(config)
    method = build_method(args.method, generator, reward, features, config)
    print(f"{row['prompt']!r} ({row['tag']}), {args.method}, {args.steps} updates")
    print("before", judge(generator, reward, row), flush=True)
    source = OnlineReference(generator, [row["prompt"]], candidates=config["train"]["candidates"], seed=0)
    settings = TrainSettings.from_config(config["train"], 0, args.method)
    with tempfile.TemporaryDirectory() as run_dir:
        train(method, source, settings, run_dir, identity={}, metadata=[row], log=lambda *_: None)
    print("after ", judge(generator, reward, row), flush=True)


def _set(config: dict, path: str, value) -> None:
    """config[a][b]... = value for path "a.b..."; a mapping value replaces the old one whole."""
    *parents, last = path.split(".")
    node = config
    for key in parents:
        node = node[key]
    if last not in node:
        raise KeyError(f"--set {path}: no key {last!r} in the config (known: {sorted(node)})")
    node[last] = value


if __name__ == "__main__":
    main()
