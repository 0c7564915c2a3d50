"""Reference worker: score = mean pixel value in [0, 1] (+ metadata["offset"] if given).

A template for real workers and the worker of the tests.

Prompts starting with "!" make it misbehave on purpose, so the tests can exercise the client's failure
handling: "!crash" exits with code 3, "!hang" never answers, "!nan" returns NaN, "!count" returns one score
too few, "!error" raises (the worker answers with an error response and stays up).
`--fail-load` makes loading fail; `--load-delay S` sleeps S seconds before the handshake.
"""

import argparse
import os
import sys
import time

import numpy as np

from protocol import serve


def score(images, prompts, metadata):
    for prompt in prompts:
        if prompt == "!crash":
            print("mean_brightness_worker: crashing on purpose", file=sys.stderr, flush=True)
            os._exit(3)
        if prompt == "!hang":
            time.sleep(3600)
        if prompt == "!error":
            raise ValueError("asked to fail")
    scores = [float(np.asarray(image, dtype=np.float64).mean() / 255) for image in images]
    if metadata is not None:
        scores = [s + float(row.get("offset", 0.0)) for s, row in zip(scores, metadata)]
    if "!nan" in prompts:
        scores[prompts.index("!nan")] = float("nan")
    if "!count" in prompts:
        scores = scores[:-1]
    return scores


def load(args):
    time.sleep(args.load_delay)
    if args.fail_load:
        raise RuntimeError("asked to fail while loading")
    return score


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fail-load", action="store_true")
    parser.add_argument("--load-delay", type=float, default=0.0)
    args = parser.parse_args()
    serve(lambda: load(args), name="mean_brightness", version="1")
