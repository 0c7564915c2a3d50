"""Reading preference datasets row by row: the authors' JSONL and the Pick-a-Pic v2 Parquet layout.

Both readers stream :class:`PreferenceRow` objects (a prompt, its chosen and rejected images, and ``where``, the file
and row that errors name) and never hold more than one Parquet record batch. Images stay undecoded
(:class:`ImageRef`) until :func:`load_image` is called, so a resumed cache skips rows without decoding them.

* JSONL (method spec section 7): one row per prompt, ``{"prompt": str, "chosen": path | [paths],
  "rejected": path | [paths]}``, paths relative to the file's folder; blank lines are skipped.
* Pick-a-Pic v2 as it ships: a folder of Parquet shards (or one shard) with the columns ``caption``, ``jpg_0``,
  ``jpg_1`` (JPEG bytes) and ``label_0`` / ``label_1`` (1/0 or 0/1: the preferred image; 0.5/0.5: a tie). Other
  columns are ignored. Ties carry no preference: they are skipped and counted in :class:`ReadStats`. Captions repeat
  across rows; every row is one pair, as in the authors' data loader.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from drpo.images import from_uint8

FORMATS = ("jsonl", "pickapic")
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
# Pick-a-Pic's labels: which image of the pair was preferred, or a tie.
_CHOICES = {(1.0, 0.0): 0, (0.0, 1.0): 1}
_TIE = (0.5, 0.5)
_BATCH_ROWS = 64  # Parquet rows read at once: the reader's memory


@dataclass(frozen=True)
class ImageRef:
    """One image of a row, not yet decoded: a file (``path``) or encoded bytes (``data``, a Parquet cell).

    ``name`` is how the row spells it (the path as written, or the column) and ``stamp`` what identifies its content
    cheaply: a file's size and modification time, or the shard's, so that a cache notices a changed image.
    """

    name: str
    stamp: str
    path: Path | None = None
    data: bytes | None = None


@dataclass(frozen=True)
class PreferenceRow:
    """A prompt with its chosen and rejected images; ``where`` names the file and row (for every error)."""

    prompt: str
    chosen: tuple[ImageRef, ...]
    rejected: tuple[ImageRef, ...]
    where: str

    @property
    def sources(self) -> list[str]:
        """What the row's images are: a cache built from other images is not reused."""
        return [f"{role}:{ref.name}:{ref.stamp}" for role, refs in (("chosen", self.chosen), ("rejected", self.rejected))
                for ref in refs]


@dataclass
class ReadStats:
    """What a pass over a dataset skipped: Pick-a-Pic ties (label 0.5 / 0.5)."""

    ties: int = 0
    tie_rows: list[str] = field(default_factory=list)  # the first few, for the log


def dataset_format(path: str | Path, format: str) -> str:
    """The format of a dataset path: ``format`` itself, or for "auto" jsonl for a .jsonl file and pickapic for a
    .parquet file or a folder."""
    path = Path(path)
    if format in FORMATS:
        return format
    if format != "auto":
        raise ValueError(f"unknown preference dataset format {format!r}; valid: auto, {', '.join(FORMATS)}")
    if path.suffix == ".jsonl":
        return "jsonl"
    if path.suffix == ".parquet" or path.is_dir():
        return "pickapic"
    raise ValueError(f"{path}: cannot tell the preference dataset's format; give a .jsonl file (the authors' JSONL) "
                     "or a folder of .parquet shards (Pick-a-Pic v2), or set preferences.format")


def read_preferences(path: str | Path, format: str = "auto", stats: ReadStats | None = None) -> Iterator[PreferenceRow]:
    """Stream the rows of a preference dataset (JSONL file, or Pick-a-Pic Parquet folder or shard).

    Raises ValueError naming the file and row for a malformed row, FileNotFoundError for a missing dataset.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"preference dataset not found: {path}")
    if dataset_format(path, format) == "jsonl":
        return _read_jsonl(path)
    return _read_pickapic(path, stats if stats is not None else ReadStats())


def _image_list(value, key: str, where: str) -> list[str]:
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p.strip() for p in paths):
        raise ValueError(f"{where}: no {key} images; expected \"{key}\": a path or a non-empty list of paths, "
                         f"got {value!r}")
    return paths


def _file_ref(name: str, folder: Path) -> ImageRef:
    path = folder / name
    try:
        info = path.stat()
        stamp = f"{info.st_size}:{info.st_mtime_ns}"
    except OSError:
        stamp = "missing"  # reported by load_image, with the row
    return ImageRef(name=name, stamp=stamp, path=path)


def _read_jsonl(path: Path) -> Iterator[PreferenceRow]:
    with path.open() as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: invalid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected an object with prompt, chosen and rejected, got {row!r:.80}")
            prompt = row.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"{where}: empty prompt; expected \"prompt\": a non-empty string, got {prompt!r}")
            refs = {key: tuple(_file_ref(name, path.parent) for name in _image_list(row.get(key), key, where))
                    for key in ("chosen", "rejected")}
            yield PreferenceRow(prompt, refs["chosen"], refs["rejected"], where)


def pickapic_shards(path: Path) -> list[Path]:
    """The Parquet shards of a Pick-a-Pic folder (sorted by name), or the one shard given."""
    shards = [path] if path.is_file() else sorted(path.glob("*.parquet"))
    if not shards:
        raise ValueError(f"{path} has no .parquet shards; a Pick-a-Pic v2 folder holds shards with the columns "
                         f"{', '.join(PICKAPIC_COLUMNS)}")
    return shards


def _read_pickapic(path: Path, stats: ReadStats) -> Iterator[PreferenceRow]:
    import pyarrow.parquet as pq

    for shard in pickapic_shards(path):
        try:
            handle = pq.ParquetFile(shard)
        except Exception as error:  # pyarrow raises its own types for a file that is not Parquet
            raise ValueError(f"{shard}: not a readable Parquet file ({error})") from None
        missing = [c for c in PICKAPIC_COLUMNS if c not in handle.schema_arrow.names]
        if missing:
            raise ValueError(f"{shard} lacks the columns {missing}; a Pick-a-Pic v2 shard has "
                             f"{', '.join(PICKAPIC_COLUMNS)} (it has {', '.join(handle.schema_arrow.names)})")
        info = shard.stat()
        stamp = f"{shard.name}:{info.st_size}:{info.st_mtime_ns}"
        index = 0
        for batch in handle.iter_batches(batch_size=_BATCH_ROWS, columns=list(PICKAPIC_COLUMNS)):
            columns = batch.to_pydict()
            for caption, jpg_0, jpg_1, label_0, label_1 in zip(*(columns[c] for c in PICKAPIC_COLUMNS)):
                where = f"{shard} row {index}"
                row = _pickapic_row(caption, (jpg_0, jpg_1), (label_0, label_1), where, f"{stamp}#{index}", stats)
                index += 1
                if row is not None:
                    yield row


def _pickapic_row(caption, images, labels, where: str, stamp: str, stats: ReadStats) -> PreferenceRow | None:
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"{where}: empty prompt (caption {caption!r})")
    if None in labels:
        raise ValueError(f"{where}: no label (label_0 {labels[0]!r}, label_1 {labels[1]!r})")
    labels = (float(labels[0]), float(labels[1]))
    if labels == _TIE:
        stats.ties += 1
        if len(stats.tie_rows) < 5:
            stats.tie_rows.append(where)
        return None
    if labels not in _CHOICES:
        raise ValueError(f"{where}: labels {labels} are neither a preference (1/0 or 0/1) nor a tie (0.5/0.5)")
    for k, data in enumerate(images):
        if not data:
            raise ValueError(f"{where}: no jpg_{k} image, so the row has no "
                             f"{'chosen' if k == _CHOICES[labels] else 'rejected'} image")
    chosen = _CHOICES[labels]
    refs = [ImageRef(name=f"jpg_{k}", stamp=stamp, data=images[k]) for k in (chosen, 1 - chosen)]
    return PreferenceRow(caption, (refs[0],), (refs[1],), where)


def load_image(ref: ImageRef, resolution: int, where: str) -> torch.Tensor:
    """An image of a row as the generator's VAE takes it: RGB, the shorter side resized (bilinear) to
    ``resolution``, centre-cropped to a square, scaled to [-1, 1]: (3, resolution, resolution) float32."""
    role = f"image {ref.name!r}" + (f" ({ref.path})" if ref.path is not None else "")
    try:
        with Image.open(ref.path if ref.path is not None else io.BytesIO(ref.data)) as opened:
            image = opened.convert("RGB")
    except FileNotFoundError:
        raise ValueError(f"{where}: {role} does not exist") from None
    except Exception as error:  # PIL raises several types for a file that is not an image
        raise ValueError(f"{where}: {role} cannot be read as an image ({type(error).__name__}: {error})") from None
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, Image.BILINEAR)  # a no-op copy when already at the resolution
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return from_uint8(np.array(image)[None])[0]
