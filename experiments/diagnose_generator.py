"""Why does (or doesn't) ranking-based finetuning move GenEval-lite? A diagnostic of a miniature generator.

Samples every test prompt with `--seeds` noises, judges each image with the miniature's detector and scores it
with the target reward, then prints: the pass rate per tag, the most common rejection reasons, how many prompts
have both passing and failing samples (only those can teach a ranking method anything about the detector), the
reward's within-prompt AUC on them, and how often the reward's top 4 of a prompt pass.

    python experiments/diagnose_generator.py --generator resources/miniature/generator \
        --reward resources/miniature/reward --prompts results/world/test_metadata.jsonl
"""

from __future__ import annotations

import argparse
import collections

import numpy as np
import torch

from drpo.evaluate import sample_latents
from drpo.generators import load_generator
from drpo.images import to_uint8
from drpo.prompt_files import read_rows
from drpo.rewards import PickScoreReward
from drpo.world.detect import judge
from drpo.world.spec import WorldSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generator", default="resources/miniature/generator")
    parser.add_argument("--reward", default="resources/miniature/reward")
    parser.add_argument("--prompts", default="results/world/test_metadata.jsonl")
    parser.add_argument("--seeds", type=int, default=16)
    args = parser.parse_args()

    spec = WorldSpec()
    rows = read_rows(args.prompts)
    generator = load_generator(args.generator, "sd-turbo", device="cpu")
    reward = PickScoreReward(args.reward)
    seeds = list(range(args.seeds))
    with torch.no_grad():
        images = generator.decode(sample_latents(generator, [row["prompt"] for row in rows], seeds, batch_size=256))
        prompts = [rows[i // len(seeds)]["prompt"] for i in range(len(images))]
        scores = reward.score(images, prompts).numpy().reshape(len(rows), len(seeds))
        pixels = to_uint8(images).numpy()
    verdicts = [judge(image, rows[i // len(seeds)], spec) for i, image in enumerate(pixels)]
    passed = np.array([ok for ok, _ in verdicts]).reshape(len(rows), len(seeds))

    by_tag = collections.defaultdict(list)
    for row, row_passed in zip(rows, passed):
        by_tag[row["tag"]].append(row_passed.mean())
    print("pass rate:", f"{passed.mean():.3f} overall;",
          ", ".join(f"{tag} {np.mean(v):.3f} ({len(v)} prompts)" for tag, v in by_tag.items()))
    reasons = collections.Counter(reason.split(",")[0].splitlines()[0] for ok, reason in verdicts if not ok)
    print("most common rejections:", reasons.most_common(8))
    mixed = [i for i in range(len(rows)) if 0 < passed[i].sum() < len(seeds)]
    aucs = [(scores[i][passed[i]][:, None] > scores[i][~passed[i]][None]).mean() for i in mixed]
    print(f"prompts with passing and failing samples: {len(mixed)} of {len(rows)}; reward AUC on them:",
          f"{np.mean(aucs):.3f}" if aucs else "n/a")
    top = np.argsort(-scores, axis=1)[:, :4]
    print(f"pass rate of each prompt's reward top 4: {np.take_along_axis(passed, top, axis=1).mean():.3f}")


if __name__ == "__main__":
    main()
