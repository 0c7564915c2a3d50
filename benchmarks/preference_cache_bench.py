"""Benchmark of the preference dataset's latent cache (drpo.preferences): peak memory must not grow with the rows.

For each format (Pick-a-Pic v2 Parquet shards, the authors' JSONL with PNG files) and each row count (default 1,000
and 10,000), a synthetic dataset of random images (48 x 40 px, so every image is resized and cropped) is written,
then a fresh Python process (so that peaks do not mix) builds the cache with the miniature generator's VAE (32 px,
``--chunk-rows`` rows a chunk) and reads every row's latents back through drpo.preferences.LatentCache, as training
does. Per case: wall seconds of the build, peak RSS of the process before the build (models loaded), after the
build and after the read-back, and the cache's size on disk (what holding the latents in memory would add).

    python benchmarks/preference_cache_bench.py --rows 1000 10000 --out results/bench/preference_cache.csv
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SIZE = (48, 40)  # width, height: larger than the miniature's 32 px, not square


def _image(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8)


def write_pickapic(folder: Path, rows: int, shard_rows: int = 1000) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for shard, start in enumerate(range(0, rows, shard_rows)):
        table = []
        for i in range(start, min(rows, start + shard_rows)):
            images = []
            for _ in range(2):
                buffer = io.BytesIO()
                Image.fromarray(_image(rng)).save(buffer, format="JPEG", quality=95)
                images.append(buffer.getvalue())
            table.append({"caption": f"prompt {i}", "jpg_0": images[0], "jpg_1": images[1],
                          "label_0": float(i % 2), "label_1": float(1 - i % 2)})
        pq.write_table(pa.Table.from_pylist(table), folder / f"train-{shard:05d}.parquet")
    return folder


def write_jsonl(folder: Path, rows: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    with (folder / "pairs.jsonl").open("w") as handle:
        for i in range(rows):
            names = [f"images/{i}_{k}.png" for k in range(2)]
            for name in names:
                Image.fromarray(_image(rng)).save(folder / name)
            handle.write(json.dumps({"prompt": f"prompt {i}", "chosen": names[0], "rejected": names[1]}) + "\n")
    return folder / "pairs.jsonl"


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def child(dataset: str, cache: str, chunk_rows: int) -> None:
    """Build and read back the cache in this process; print one JSON line of measurements."""
    import torch

    from drpo.generators import load_generator
    from drpo.preferences import LatentCache, build_latent_cache

    torch.set_num_threads(1)
    generator = load_generator(REPO / "resources/miniature/generator", "sd-turbo")
    before = _peak_mb()
    began = time.perf_counter()
    record = build_latent_cache(dataset, cache, generator.vae, resolution=generator.resolution,
                                chunk_rows=chunk_rows, log=lambda *_: None)
    seconds = time.perf_counter() - began
    built = _peak_mb()
    latents = LatentCache(cache)
    total = 0.0
    for row in range(len(latents)):
        chosen, rejected = latents.pair(row)
        total += float(chosen.sum() + rejected.sum())
    size = sum(p.stat().st_size for p in Path(cache).iterdir())
    print(json.dumps({"rows": record["rows"], "build_s": round(seconds, 1), "peak_rss_mb_models": round(before),
                      "peak_rss_mb_built": round(built), "peak_rss_mb_read": round(_peak_mb()),
                      "cache_mb": round(size / 2**20, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--formats", nargs="+", default=["pickapic", "jsonl"], choices=["pickapic", "jsonl"])
    parser.add_argument("--chunk-rows", type=int, default=32)
    parser.add_argument("--out", default=None, help="CSV of the measurements")
    parser.add_argument("--child", nargs=3, metavar=("DATASET", "CACHE", "CHUNK_ROWS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    results = []
    scratch = Path(tempfile.mkdtemp(prefix="preference_bench_"))
    try:
        for format in args.formats:
            for rows in args.rows:
                folder = scratch / f"{format}-{rows}"
                began = time.perf_counter()
                dataset = write_pickapic(folder, rows) if format == "pickapic" else write_jsonl(folder, rows)
                written = time.perf_counter() - began
                out = subprocess.run([sys.executable, __file__, "--child", str(dataset), str(folder / "cache"),
                                      str(args.chunk_rows)], check=True, capture_output=True, text=True)
                result = {"format": format, "write_s": round(written, 1), **json.loads(out.stdout.splitlines()[-1])}
                print(result, flush=True)
                results.append(result)
                shutil.rmtree(folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.out:
        import pandas as pd

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(results).to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
