"""Preference datasets (drpo.preferences): both readers on good rows and on every kind of bad row, and the latent
cache (the generator's VAE encoding, chunks written as they go, a rerun that continues, reading back)."""

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from drpo.generators import load_generator
from drpo.preferences import (
    ImageRef,
    LatentCache,
    PreferenceSource,
    ReadStats,
    build_latent_cache,
    load_image,
    read_preferences,
)
from drpo.preferences.cache import INDEX_FILE
from drpo.reference import OnlineReference


def _image(seed: int, size=(16, 16)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def _png(path: Path, seed: int, size=(16, 16)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_image(seed, size)).save(path)
    return path.name


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_image(seed)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _jsonl(folder: Path, rows: list) -> Path:
    path = folder / "pairs.jsonl"
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def _shard(path: Path, rows: list[dict], drop: tuple[str, ...] = ()) -> Path:
    table = pa.Table.from_pylist([{k: v for k, v in row.items() if k not in drop} for row in rows])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def _pair(caption, labels, seeds=(1, 2), **extra) -> dict:
    return {"caption": caption, "jpg_0": _jpeg(seeds[0]), "jpg_1": _jpeg(seeds[1]),
            "label_0": labels[0], "label_1": labels[1], **extra}


# ------------------------------------------------------------------------------------------ the JSONL reader
def test_jsonl_rows_take_a_path_or_a_list_relative_to_the_file(tmp_path):
    a, b, c = (_png(tmp_path / "img" / f"{n}.png", i) for i, n in enumerate("abc"))
    path = _jsonl(tmp_path, [{"prompt": "a red circle", "chosen": f"img/{a}", "rejected": [f"img/{b}", f"img/{c}"]},
                             "", {"prompt": "a blue square", "chosen": [f"img/{c}"], "rejected": f"img/{a}",
                                  "extra": 1}])
    rows = list(read_preferences(path))
    assert [r.prompt for r in rows] == ["a red circle", "a blue square"]
    assert [ref.path for ref in rows[0].rejected] == [tmp_path / "img/b.png", tmp_path / "img/c.png"]
    assert rows[1].where == f"{path} line 3"  # the blank line is skipped but counted
    pixels = load_image(rows[0].chosen[0], 16, rows[0].where)
    expected = torch.from_numpy(np.asarray(Image.open(tmp_path / "img/a.png"))).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(pixels, expected)  # already at the resolution: unchanged, scaled to [-1, 1]


def test_images_are_resized_on_the_shorter_side_and_centre_cropped(tmp_path):
    image = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high
    image[:, 6:34] = 255  # a white band around the middle 20 columns: the crop keeps nothing else
    Image.fromarray(image).convert("L").convert("RGB").save(tmp_path / "wide.png")
    path = _jsonl(tmp_path, [{"prompt": "p", "chosen": "wide.png", "rejected": "wide.png"}])
    row = next(read_preferences(path))
    pixels = load_image(row.chosen[0], 10, row.where)  # 40x20 -> 20x10 -> centre 10x10: the band's middle
    assert pixels.shape == (3, 10, 10) and pixels.min() > 0.9


@pytest.mark.parametrize("line,message", [
    ("{not json", r"line 1: invalid JSON"),
    ('["a", "b"]', r"line 1: expected an object"),
    ('{"prompt": "", "chosen": "a.png", "rejected": "b.png"}', r"line 1: empty prompt"),
    ('{"chosen": "a.png", "rejected": "b.png"}', r"line 1: empty prompt"),
    ('{"prompt": "p", "rejected": "b.png"}', r"line 1: no chosen images"),
    ('{"prompt": "p", "chosen": "a.png", "rejected": []}', r"line 1: no rejected images"),
    ('{"prompt": "p", "chosen": ["a.png", 3], "rejected": "b.png"}', r"line 1: no chosen images"),
])
def test_jsonl_bad_rows_name_the_file_and_line(tmp_path, line, message):
    path = _jsonl(tmp_path, [line])
    with pytest.raises(ValueError, match=f"pairs.jsonl {message}"):
        list(read_preferences(path))


def test_missing_and_unreadable_images_name_the_row_and_the_image(tmp_path):
    (tmp_path / "not_an_image.png").write_text("hello")
    path = _jsonl(tmp_path, [{"prompt": "p", "chosen": "gone.png", "rejected": "not_an_image.png"}])
    row = next(read_preferences(path))
    with pytest.raises(ValueError, match=r"pairs.jsonl line 1: image 'gone.png' .* does not exist"):
        load_image(row.chosen[0], 8, row.where)
    with pytest.raises(ValueError, match=r"pairs.jsonl line 1: image 'not_an_image.png' .* cannot be read"):
        load_image(row.rejected[0], 8, row.where)


# ------------------------------------------------------------------------------------------ the Pick-a-Pic reader
def test_pickapic_rows_follow_the_labels_and_ties_are_skipped_and_counted(tmp_path):
    folder = tmp_path / "pickapic"
    _shard(folder / "train-00000-of-00002.parquet", [
        _pair("a cat", (1.0, 0.0), (1, 2), user_id=7), _pair("a dog", (0.5, 0.5)), _pair("a cat", (0.0, 1.0), (3, 4))])
    _shard(folder / "train-00001-of-00002.parquet", [_pair("a car", (0, 1), (5, 6))])
    stats = ReadStats()
    rows = list(read_preferences(folder, "auto", stats))
    assert [r.prompt for r in rows] == ["a cat", "a cat", "a car"]
    assert stats.ties == 1 and stats.tie_rows == [f"{folder / 'train-00000-of-00002.parquet'} row 1"]
    assert rows[1].where.endswith("train-00000-of-00002.parquet row 2")
    first, second = rows[0], rows[1]
    assert first.chosen[0].data == _jpeg(1) and first.rejected[0].data == _jpeg(2)  # label_0 = 1: jpg_0 preferred
    assert second.chosen[0].data == _jpeg(4) and second.rejected[0].data == _jpeg(3)  # label_1 = 1: jpg_1 preferred
    assert load_image(first.chosen[0], 16, first.where).shape == (3, 16, 16)


@pytest.mark.parametrize("row,message", [
    (_pair("", (1.0, 0.0)), r"row 0: empty prompt"),
    (_pair(None, (1.0, 0.0)), r"row 0: empty prompt"),
    (_pair("p", (None, 0.0)), r"row 0: no label"),
    (_pair("p", (0.7, 0.3)), r"row 0: labels \(0.7, 0.3\) are neither a preference"),
    (_pair("p", (1.0, 0.0)) | {"jpg_1": b""}, r"row 0: no jpg_1 image, so the row has no rejected image"),
    (_pair("p", (1.0, 0.0)) | {"jpg_0": None}, r"row 0: no jpg_0 image, so the row has no chosen image"),
])
def test_pickapic_bad_rows_name_the_shard_and_row(tmp_path, row, message):
    _shard(tmp_path / "s.parquet", [row])
    with pytest.raises(ValueError, match=f"s.parquet {message}"):
        list(read_preferences(tmp_path))


def test_a_shard_without_the_columns_or_that_is_no_parquet_is_named(tmp_path):
    _shard(tmp_path / "a" / "s.parquet", [_pair("p", (1.0, 0.0))], drop=("label_1", "jpg_0"))
    with pytest.raises(ValueError, match=r"s.parquet lacks the columns \['jpg_0', 'label_1'\]"):
        list(read_preferences(tmp_path / "a"))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "s.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match=r"s.parquet: not a readable Parquet file"):
        list(read_preferences(tmp_path / "b"))
    (tmp_path / "c").mkdir()
    with pytest.raises(ValueError, match=r"has no .parquet shards"):
        list(read_preferences(tmp_path / "c"))
    with pytest.raises(FileNotFoundError, match="preference dataset not found"):
        read_preferences(tmp_path / "nowhere.jsonl")


def test_an_undecodable_jpeg_names_the_shard_row(tmp_path):
    _shard(tmp_path / "s.parquet", [_pair("p", (1.0, 0.0)) | {"jpg_0": b"\xff\xd8 garbage"}])
    row = next(read_preferences(tmp_path))
    with pytest.raises(ValueError, match=r"s.parquet row 0: image 'jpg_0' cannot be read as an image"):
        load_image(row.chosen[0], 16, row.where)


# ------------------------------------------------------------------------------------------ the latent cache
@pytest.fixture(scope="module")
def vae_generator(tiny_models):
    return load_generator(tiny_models["generator"], "sd-turbo")


def _dataset(folder: Path, n: int, start: int = 0) -> Path:
    rows = []
    for i in range(start, start + n):
        names = [f"img/{i}_{k}.png" for k in range(3)]
        for k, name in enumerate(names):
            _png(folder / name, 10 * i + k, size=(24, 20))
        rows.append({"prompt": f"prompt {i}", "chosen": names[:2], "rejected": names[2]})
    return _jsonl(folder, rows)


def _encode(generator, folder: Path, names: list[str]) -> torch.Tensor:
    """The VAE's latents of image files, encoded directly (posterior mode x scaling factor)."""
    refs = [ImageRef(name=name, stamp="", path=folder / name) for name in names]
    images = torch.stack([load_image(ref, generator.resolution, "") for ref in refs])
    with torch.no_grad():
        return generator.vae.encode(images).latent_dist.mode() * generator.vae.config.scaling_factor


def test_the_cache_holds_each_rows_vae_latents_and_serves_them_to_training(tmp_path, vae_generator):
    data = _dataset(tmp_path / "data", 5)
    record = build_latent_cache(data, tmp_path / "cache", vae_generator.vae, resolution=vae_generator.resolution,
                                chunk_rows=2, log=lambda *_: None)
    assert record["rows"] == 5 and record["chunks"] == 3
    cache = LatentCache(tmp_path / "cache")
    assert cache.prompts == [f"prompt {i}" for i in range(5)]
    chosen, rejected = cache.pair(3)
    torch.testing.assert_close(chosen, _encode(vae_generator, tmp_path / "data", ["img/3_0.png", "img/3_1.png"]))
    torch.testing.assert_close(rejected, _encode(vae_generator, tmp_path / "data", ["img/3_2.png"]))
    reference = OnlineReference(vae_generator, cache.prompts, candidates=4, seed=0)
    source = PreferenceSource(cache, reference)
    noise, base = source.cell(3, 0)
    assert noise.shape == base.shape == (4, *vae_generator.latent_shape)
    torch.testing.assert_close(source.pair(3)[0], chosen)


def test_sampled_latents_are_seeded_per_image_whatever_the_chunks(tmp_path, vae_generator):
    data = _dataset(tmp_path / "data", 3)
    for name, chunk in (("a", 1), ("b", 3)):
        build_latent_cache(data, tmp_path / name, vae_generator.vae, resolution=vae_generator.resolution,
                           encode="sample", chunk_rows=chunk, log=lambda *_: None)
    a, b = LatentCache(tmp_path / "a"), LatentCache(tmp_path / "b")
    mode = _encode(vae_generator, tmp_path / "data", ["img/2_0.png", "img/2_1.png"])
    torch.testing.assert_close(a.pair(2)[0], b.pair(2)[0])
    assert not torch.allclose(a.pair(2)[0], mode)


def test_a_bad_row_keeps_the_rows_before_it_and_a_rerun_continues_there(tmp_path, vae_generator):
    data = _dataset(tmp_path / "data", 5)
    (tmp_path / "data" / "img/3_1.png").unlink()  # row 3 (line 4) lacks an image
    build = dict(resolution=vae_generator.resolution, chunk_rows=2)
    with pytest.raises(ValueError, match=r"pairs.jsonl line 4: image 'img/3_1.png' .* does not exist"):
        build_latent_cache(data, tmp_path / "cache", vae_generator.vae, **build, log=lambda *_: None)
    index = [json.loads(line) for line in (tmp_path / "cache" / INDEX_FILE).read_text().splitlines()]
    assert [(e["first"], e["rows"]) for e in index] == [(0, 2), (2, 1)]  # rows 0-2 kept, row 2 written alone
    with pytest.raises(FileNotFoundError, match="not a finished latent cache"):
        LatentCache(tmp_path / "cache")
    first_chunk = tmp_path / "cache" / index[0]["file"]
    written = first_chunk.stat().st_mtime_ns
    _png(tmp_path / "data" / "img/3_1.png", 31, size=(24, 20))  # the dataset is fixed
    messages = []
    record = build_latent_cache(data, tmp_path / "cache", vae_generator.vae, **build, log=messages.append)
    assert record["rows"] == 5 and any("3 rows already encoded" in m for m in messages)
    assert first_chunk.stat().st_mtime_ns == written  # not encoded again
    torch.testing.assert_close(LatentCache(tmp_path / "cache").pair(3)[0],
                               _encode(vae_generator, tmp_path / "data", ["img/3_0.png", "img/3_1.png"]))


def test_a_changed_row_or_encoding_is_encoded_again(tmp_path, vae_generator):
    data = _dataset(tmp_path / "data", 4)
    build = dict(resolution=vae_generator.resolution, chunk_rows=2)
    build_latent_cache(data, tmp_path / "cache", vae_generator.vae, **build, log=lambda *_: None)
    rows = data.read_text().splitlines()
    rows[2] = rows[2].replace("prompt 2", "prompt two")
    data.write_text("\n".join(rows) + "\n")
    messages = []
    build_latent_cache(data, tmp_path / "cache", vae_generator.vae, **build, log=messages.append)
    assert any("rows from 2 on differ" in m for m in messages)
    assert LatentCache(tmp_path / "cache").prompts[2] == "prompt two"
    messages.clear()
    record = build_latent_cache(data, tmp_path / "cache", vae_generator.vae, **build, encode="sample",
                                max_rows=3, log=messages.append)
    assert any("encoding afresh" in m for m in messages) and record["rows"] == 3


def test_the_worlds_pickapic_shards_with_ties_go_through_the_cache(tmp_path, vae_generator):
    _shard(tmp_path / "pap" / "train-00000-of-00001.parquet",
           [_pair("a cat", (1.0, 0.0)), _pair("a cat", (0.5, 0.5)), _pair("a dog", (0.0, 1.0), (7, 8))])
    record = build_latent_cache(tmp_path / "pap", tmp_path / "cache", vae_generator.vae,
                                resolution=vae_generator.resolution, log=lambda *_: None)
    assert record["rows"] == 2 and record["ties_skipped"] == 1
    chosen, rejected = LatentCache(tmp_path / "cache").pair(1)
    assert chosen.shape == rejected.shape == (1, *vae_generator.latent_shape)


def test_a_malformed_row_keeps_the_rows_read_before_it(tmp_path, vae_generator):
    data = _dataset(tmp_path / "data", 3)
    data.write_text(data.read_text() + '{"prompt": "  ", "chosen": "a.png", "rejected": "b.png"}\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl line 4: empty prompt"):
        build_latent_cache(data, tmp_path / "cache", vae_generator.vae, resolution=vae_generator.resolution,
                           chunk_rows=2, log=lambda *_: None)
    index = [json.loads(line) for line in (tmp_path / "cache" / INDEX_FILE).read_text().splitlines()]
    assert [(e["first"], e["rows"]) for e in index] == [(0, 2), (2, 1)]
