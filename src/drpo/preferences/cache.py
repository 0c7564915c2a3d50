"""The VAE latents of a preference dataset, encoded once and kept on disk (rule preference_latents).

Layout of a cache folder::

    cache.json                      what it belongs to: the dataset's path and format, the VAE, resolution, encoding
    chunk-<first row>.safetensors   consecutive rows: tensors "<row>.chosen" (P, C, h, w), "<row>.rejected" (M, C, h, w)
    index.jsonl                     one line per chunk: file, first row, rows, their prompts and image sources
    done.json                       written last: rows, ties skipped, the index's digest

Building streams the dataset: ``chunk_rows`` rows are read, their images encoded (UNet-space latents: the VAE
posterior's mode, or a sample of it, times the scaling factor) and written as one chunk (a temporary file renamed
into place, then its index line), so memory holds one chunk whatever the dataset's size. A rerun continues after the
last chunk: it reads the rows already cached again without decoding their images and checks their prompts and
image sources (name, size and time of each file or shard) against the index; from the first that differs on, the
cache is rebuilt. When a row fails (a missing image, an empty prompt), the rows read before it are written first,
so after the dataset is fixed the rerun resumes there.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Callable, Iterator
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from drpo.preferences.read import PreferenceRow, ReadStats, dataset_format, load_image, read_preferences

ENCODINGS = ("mode", "sample")
IDENTITY_FILE = "cache.json"
INDEX_FILE = "index.jsonl"
DONE_FILE = "done.json"
_CHUNK_PREFIX = "chunk-"


def build_latent_cache(dataset: str | Path, folder: str | Path, vae, *, resolution: int, format: str = "auto",
                       encode: str = "mode", chunk_rows: int = 32, max_rows: int | None = None,
                       model: dict[str, Any] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Encode every row of ``dataset`` into the cache ``folder`` (continuing a cache of the same identity) and write
    its ``done.json``; returns that record. ``vae`` is the generator's AutoencoderKL, ``model`` what identifies it.

    Raises ValueError naming the file and row of the first bad row, after writing the rows before it.
    """
    if encode not in ENCODINGS:
        raise ValueError(f"unknown latent encoding {encode!r}; valid: {', '.join(ENCODINGS)}")
    stats = ReadStats()
    rows: Iterator[PreferenceRow] = iter(read_preferences(dataset, format, stats))  # a missing dataset fails here
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DONE_FILE).unlink(missing_ok=True)
    identity = {"dataset": str(Path(dataset).resolve()), "format": dataset_format(dataset, format),
                "encode": encode, "resolution": resolution, "model": model or {},
                "vae": json.loads(json.dumps(dict(vae.config), default=str))}
    _claim(folder, identity, log)
    if max_rows is not None:
        rows = islice(rows, max_rows)
    first, pending = _keep_matching(folder, rows, log)
    if first:
        log(f"{folder}: {first} rows already encoded, continuing after them")
    encoder = _Encoder(vae, resolution, encode, chunk_rows)
    buffer: list[PreferenceRow] = []
    stream = chain(pending, rows)
    while True:
        try:
            row = next(stream)
        except StopIteration:
            break
        except ValueError:  # a malformed row: keep the rows read before it
            _write_chunk(folder, first, buffer, encoder)
            raise
        buffer.append(row)
        if len(buffer) == chunk_rows:
            first = _write_chunk(folder, first, buffer, encoder)
            buffer = []
    first = _write_chunk(folder, first, buffer, encoder)
    if first == 0:
        raise ValueError(f"{dataset} has no preference rows ({stats.ties} ties skipped)")
    if stats.ties:
        log(f"skipped {stats.ties} ties (label 0.5 / 0.5), e.g. {', '.join(stats.tie_rows)}")
    record = {"rows": first, "chunks": sum(1 for _ in _entries(folder)), "ties_skipped": stats.ties,
              "index_sha256": _digest(folder), "identity": identity}
    (folder / DONE_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return record


def _claim(folder: Path, identity: dict, log) -> None:
    """Make the folder belong to ``identity``: chunks of another dataset, VAE or encoding are removed."""
    recorded = folder / IDENTITY_FILE
    previous = json.loads(recorded.read_text()) if recorded.is_file() else None
    if previous != identity and (folder / INDEX_FILE).exists():
        log(f"{folder} held latents of another dataset, VAE or encoding: encoding afresh")
        _truncate(folder, 0, 0)
    recorded.write_text(json.dumps(identity, indent=1, sort_keys=True) + "\n")


def _entries(folder: Path) -> Iterator[tuple[dict[str, Any], int]]:
    """(entry, byte offset of its end) of every index line, up to the first that is malformed, out of sequence or
    whose chunk is missing or damaged (a job killed while writing them). Streamed: memory holds one line."""
    index = folder / INDEX_FILE
    if not index.is_file():
        return
    expected, offset = 0, 0
    with index.open("rb") as handle:
        for line in handle:
            try:
                entry = json.loads(line)
                if entry["first"] != expected or len(entry["prompts"]) != entry["rows"] or not line.endswith(b"\n"):
                    return
                with safe_open(str(folder / entry["file"]), framework="pt") as chunk:
                    if f"{expected + entry['rows'] - 1}.rejected" not in chunk.keys():
                        return
            except Exception:  # a torn line or a truncated chunk: the cache ends before it
                return
            offset += len(line)
            expected += entry["rows"]
            yield entry, offset


def _truncate(folder: Path, rows: int, offset: int) -> None:
    """Keep the index up to ``offset`` bytes (its first ``rows`` rows) and remove every other chunk file."""
    for path in folder.glob(f"{_CHUNK_PREFIX}*"):
        start = path.name.removeprefix(_CHUNK_PREFIX).split(".")[0]
        if not start.isdigit() or int(start) >= rows or not path.name.endswith(".safetensors"):
            path.unlink()
    with (folder / INDEX_FILE).open("a+b") as handle:
        handle.truncate(offset)


def _keep_matching(folder: Path, rows: Iterator[PreferenceRow], log) -> tuple[int, list[PreferenceRow]]:
    """Rows cached whose prompts and image sources are still the dataset's first rows (their count), and the rows
    read while checking the first chunk that differs (to be encoded again); the cache is cut before that chunk."""
    kept, offset, read = 0, 0, []
    for entry, end in _entries(folder):
        read = list(islice(rows, entry["rows"]))
        if [r.prompt for r in read] != entry["prompts"] or [r.sources for r in read] != entry["sources"]:
            log(f"{folder}: rows from {entry['first']} on differ from the cached ones; encoding them again")
            break
        kept, offset, read = kept + entry["rows"], end, []
    _truncate(folder, kept, offset)
    return kept, read


class _Encoder:
    """Images of rows -> UNet-space latents with the generator's VAE, in batches of ``batch`` images."""

    def __init__(self, vae, resolution: int, encode: str, batch: int) -> None:
        self.vae, self.resolution, self.encode, self.batch = vae, resolution, encode, batch

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        vae, out = self.vae, []
        device = next(vae.parameters()).device
        for chunk, chunk_seeds in zip(images.split(self.batch), _batched(seeds, self.batch)):
            dist = vae.encode(chunk.to(device, vae.dtype)).latent_dist
            latents = dist.mode()
            if self.encode == "sample":  # one seeded draw per image: the same latents however rows are chunked
                noise = torch.stack([torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(s))
                                     for s in chunk_seeds]).to(latents)
                latents = dist.mean + dist.std * noise
            out.append((latents * vae.config.scaling_factor).float().cpu())
        return torch.cat(out)


def _batched(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _write_chunk(folder: Path, first: int, rows: list[PreferenceRow], encoder: _Encoder) -> int:
    """Encode and write rows first, first + 1, ...; returns the next row index. A row whose image cannot be read
    stops it: the rows before it are written, then the error is raised."""
    images, loaded, error = [], 0, None
    for row in rows:
        try:
            images.append([load_image(ref, encoder.resolution, row.where) for ref in (*row.chosen, *row.rejected)])
        except ValueError as bad:
            error = bad
            break
        loaded += 1
    if loaded:
        rows = rows[:loaded]
        seeds = [int(np.random.SeedSequence((first + i, k)).generate_state(1)[0])
                 for i, row_images in enumerate(images) for k in range(len(row_images))]
        latents = encoder(torch.stack([image for row_images in images for image in row_images]), seeds).split(
            [len(row_images) for row_images in images])
        tensors = {}
        for i, (row, row_latents) in enumerate(zip(rows, latents)):
            tensors[f"{first + i}.chosen"] = row_latents[: len(row.chosen)].contiguous()
            tensors[f"{first + i}.rejected"] = row_latents[len(row.chosen):].contiguous()
        name = f"{_CHUNK_PREFIX}{first:09d}.safetensors"
        tmp = folder / (name + ".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(folder / name)
        entry = {"file": name, "first": first, "rows": loaded, "prompts": [r.prompt for r in rows],
                 "sources": [r.sources for r in rows]}
        with (folder / INDEX_FILE).open("a") as handle:
            handle.write(json.dumps(entry) + "\n")
    if error is not None:
        raise error
    return first + loaded


def _digest(folder: Path) -> str:
    digest = hashlib.sha256()
    with (folder / INDEX_FILE).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class LatentCache:
    """A finished cache, read lazily: the prompts are in memory, each row's latents are read from disk on demand."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        done = self.folder / DONE_FILE
        if not done.is_file():
            raise FileNotFoundError(f"{self.folder} is not a finished latent cache (no {DONE_FILE}); build it with "
                                    "the preference_latents rule (drpo.preferences.build_latent_cache)")
        self.record = json.loads(done.read_text())
        if _digest(self.folder) != self.record["index_sha256"]:
            raise ValueError(f"{self.folder}: {INDEX_FILE} does not match {DONE_FILE}; rebuild the cache")
        self.prompts: list[str] = []
        self._firsts, self._files = [], []
        for entry, _ in _entries(self.folder):
            self.prompts += entry["prompts"]
            self._firsts.append(entry["first"])
            self._files.append(entry["file"])
        if len(self.prompts) != self.record["rows"]:
            raise ValueError(f"{self.folder}: {len(self.prompts)} rows readable of the {self.record['rows']} that "
                             f"{DONE_FILE} records; rebuild the cache")

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def digest(self) -> str:
        """What the cached rows are (their prompts and image sources): part of a training run's identity."""
        return self.record["index_sha256"]

    def pair(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen (P, C, h, w), rejected (M, C, h, w)) latents of a row."""
        if not 0 <= row < len(self.prompts):
            raise IndexError(f"row {row} of a cache of {len(self.prompts)} rows")
        file = self._files[bisect.bisect_right(self._firsts, row) - 1]
        with safe_open(str(self.folder / file), framework="pt") as handle:
            return handle.get_tensor(f"{row}.chosen"), handle.get_tensor(f"{row}.rejected")
