"""Frozen feature encoders: latent-MAE architecture, checkpoint layout, feature heads, registry."""

from pathlib import Path

import numpy as np
import pytest
import torch

from drpo.features import FEATURE_ENCODERS, build_feature_encoder
from drpo.features.latent_mae import (
    SD_TURBO_MAE_KEYS,
    LatentMAEEncoder,
    LatentMAEFeatures,
    gn_groups,
    save_checkpoint,
)
from drpo.features.raw_latent import RawLatentFeatures

WIDTHS = (16, 32, 64, 64)


def _encoder(seed: int = 0, layers=(3, 4, 6, 3), widths=WIDTHS) -> LatentMAEEncoder:
    torch.manual_seed(seed)
    enc = LatentMAEEncoder(layers=layers, widths=widths, in_channels=4)
    # Non-trivial GroupNorm affine parameters, so a scale/bias mix-up would show.
    for m in enc.modules():
        if isinstance(m, torch.nn.GroupNorm):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.2, 0.2)
    return enc


@pytest.fixture(scope="module")
def mae_ckpt(tmp_path_factory) -> tuple[Path, LatentMAEEncoder]:
    enc = _encoder()
    path = tmp_path_factory.mktemp("mae") / "mae_latent_torch.pth"
    save_checkpoint(enc, path, extra={"decoder.pred.weight": torch.randn(8, 8)})
    return path, enc.eval()


def test_gn_groups_is_largest_divisor_up_to_32():
    assert [gn_groups(c) for c in (16, 32, 48, 64, 96, 3, 40)] == [16, 32, 24, 32, 32, 3, 20]


@pytest.mark.parametrize("size, layer4", [(16, 2), (64, 8)])
def test_mae_map_shapes(size, layer4):
    enc = _encoder(layers=(1, 2, 3, 1))
    maps = enc(torch.randn(2, 4, size, size))
    assert list(maps) == list(enc.map_names) == [
        "conv1", "layer1", "layer2", "layer3_blk2", "layer3", "layer4",
    ]
    assert maps["conv1"].shape == (2, 16, size, size)
    assert maps["layer1"].shape == (2, 16, size, size)
    assert maps["layer2"].shape == (2, 32, size // 2, size // 2)
    assert maps["layer3_blk2"].shape == (2, 64, size // 4, size // 4)
    assert maps["layer4"].shape == (2, 64, layer4, layer4)


def test_paper_block_taps():
    enc = _encoder()  # layers [3, 4, 6, 3], block_stride 2: taps every 2 blocks, never the last block
    assert enc.map_names == (
        "conv1", "layer1_blk2", "layer1", "layer2_blk2", "layer2",
        "layer3_blk2", "layer3_blk4", "layer3", "layer4_blk2", "layer4",
    )


def test_checkpoint_layout_and_round_trip(mae_ckpt):
    path, enc = mae_ckpt
    raw = torch.load(path, weights_only=True)
    assert raw["metadata"]["model_config"]["layers"] == [3, 4, 6, 3]
    assert raw["metadata"]["model_config"]["widths"] == list(WIDTHS)
    assert raw["encoder.conv1.kernel"].shape == (3, 3, 4, 16)  # HWIO
    assert raw["encoder.stages_1.layers_0.proj_conv.kernel"].shape == (1, 1, 16, 32)
    assert "encoder.stages_0.layers_0.proj_conv.kernel" not in raw  # shape-preserving block: identity shortcut
    assert raw["encoder.layer4_norm.scale"].shape == (64,)
    assert "decoder.pred.weight" in raw

    loaded = LatentMAEEncoder.from_checkpoint(path)
    assert not any(p.requires_grad for p in loaded.parameters())
    x = torch.randn(3, 4, 16, 16)
    with torch.no_grad():
        ref, out = enc(x), loaded(x)
    assert set(out) == set(ref)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=0, atol=0)


def _numpy_conv_hwio(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """'same' 3x3 conv, stride 1, padding 1, kernel (kh, kw, in, out) -> (N, out, H, W)."""
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, kernel.shape[3], h, w))
    for dy in range(3):
        for dx in range(3):
            out += np.einsum("nchw,co->nohw", xp[:, :, dy : dy + h, dx : dx + w], kernel[dy, dx])
    return out


def _numpy_group_norm(x: np.ndarray, groups: int, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    n, c, h, w = x.shape
    g = x.reshape(n, groups, -1)
    g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-5)
    return g.reshape(n, c, h, w) * scale[None, :, None, None] + bias[None, :, None, None]


def _hand_written_checkpoint(rng: np.random.Generator) -> dict:
    """A flax-style export written by hand: layers [1, 1], widths (8, 16), 3 input channels."""
    t = lambda *shape: torch.from_numpy(rng.standard_normal(shape).astype(np.float32))  # noqa: E731
    ckpt = {"encoder.conv1.kernel": t(3, 3, 3, 8), "encoder.gn1.scale": t(8), "encoder.gn1.bias": t(8)}
    for s, (cin, cout) in enumerate([(8, 8), (8, 16)]):
        pre = f"encoder.stages_{s}.layers_0"
        ckpt |= {f"{pre}.conv1.kernel": t(3, 3, cin, cout), f"{pre}.conv2.kernel": t(3, 3, cout, cout)}
        for gn in ("gn1", "gn2"):
            ckpt |= {f"{pre}.{gn}.scale": t(cout), f"{pre}.{gn}.bias": t(cout)}
        if s == 1:
            ckpt |= {f"{pre}.proj_conv.kernel": t(1, 1, cin, cout), f"{pre}.proj_gn.scale": t(cout)}
            ckpt |= {f"{pre}.proj_gn.bias": t(cout)}
        ckpt |= {f"encoder.layer{s + 1}_norm.scale": t(cout), f"encoder.layer{s + 1}_norm.bias": t(cout)}
    return ckpt


def test_hand_written_hwio_checkpoint_converts_kernel_layout(tmp_path):
    rng = np.random.default_rng(0)
    ckpt = _hand_written_checkpoint(rng)
    torch.save(ckpt, tmp_path / "mae.pth")  # no metadata: architecture inferred from names and shapes
    enc = LatentMAEEncoder.from_checkpoint(tmp_path / "mae.pth")
    assert (enc.layers, enc.widths, enc.in_channels) == ([1, 1], [8, 16], 3)

    x = rng.standard_normal((2, 3, 6, 5)).astype(np.float32)  # non-square so an H/W swap would show
    with torch.no_grad():
        got = enc(torch.from_numpy(x))["conv1"].numpy()
    conv = _numpy_conv_hwio(x.astype(np.float64), ckpt["encoder.conv1.kernel"].double().numpy())
    ref = np.maximum(_numpy_group_norm(conv, 8, ckpt["encoder.gn1.scale"].numpy(), ckpt["encoder.gn1.bias"].numpy()), 0)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    ckpt = _hand_written_checkpoint(np.random.default_rng(1))
    del ckpt["encoder.stages_1.layers_0.gn2.bias"]
    ckpt["encoder.stages_0.layers_0.conv1.bias"] = torch.zeros(8)
    torch.save(ckpt, tmp_path / "bad.pth")
    with pytest.raises(KeyError, match=r"missing keys \['encoder.stages_1.layers_0.gn2.bias'\].*"
                       r"unexpected keys \['encoder.stages_0.layers_0.conv1.bias'\]"):
        LatentMAEEncoder.from_checkpoint(tmp_path / "bad.pth")


def test_metadata_must_agree_with_weights(tmp_path):
    ckpt = _hand_written_checkpoint(np.random.default_rng(2))
    ckpt["metadata"] = {"model_config": {"layers": [3, 4, 6, 3], "widths": [8, 16], "in_channels": 3}}
    torch.save(ckpt, tmp_path / "meta.pth")
    with pytest.raises(ValueError, match="model_config.layers"):
        LatentMAEEncoder.from_checkpoint(tmp_path / "meta.pth")


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        LatentMAEFeatures(tmp_path / "nope.pth")


def test_save_rejects_colliding_extra_keys(tmp_path):
    with pytest.raises(ValueError, match="collides"):
        save_checkpoint(_encoder(layers=(1, 1, 1, 1)), tmp_path / "x.pth", extra={"encoder.head.w": torch.zeros(1)})


def _numpy_stat(m: np.ndarray, stat: str, p: int | None) -> np.ndarray:
    """Reference heads: (N, C, H, W) -> (N, T, C), patches in row-major order."""
    n, c, h, w = m.shape
    if p is None:
        g = m.reshape(n, c, 1, h * w)
    else:
        g = np.stack(
            [m[:, :, i : i + p, j : j + p].reshape(n, c, p * p) for i in range(0, h, p) for j in range(0, w, p)], axis=2
        )
    out = g.mean(-1) if stat == "mean" else np.sqrt(g.var(-1) + 1e-6)
    return out.transpose(0, 2, 1)


def test_feature_heads_match_numpy():
    keys = ("latent", "latent_mean", "latent_std", "latent_mean_2", "latent_std_2", "latent_mean_4", "latent_std_4")
    enc = RawLatentFeatures(keys)
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    out = enc(x)
    xn = x.numpy()
    assert out["latent"].shape == (3, 64, 4)
    np.testing.assert_allclose(out["latent"][:, 9].numpy(), xn[:, :, 1, 1], rtol=1e-6)
    for key, stat, p, tokens in [("latent_mean", "mean", None, 1), ("latent_std", "std", None, 1),
                                 ("latent_mean_2", "mean", 2, 16), ("latent_std_2", "std", 2, 16),
                                 ("latent_mean_4", "mean", 4, 4), ("latent_std_4", "std", 4, 4)]:
        assert out[key].shape == (3, tokens, 4) and out[key].dtype == torch.float32
        np.testing.assert_allclose(out[key].numpy(), _numpy_stat(xn, stat, p), rtol=1e-5, atol=1e-6)


def test_raw_latent_spatial_stride():
    x = torch.randn(2, 4, 8, 8)
    out = RawLatentFeatures(("latent", "latent_mean"), spatial_stride=2)(x)
    assert out["latent"].shape == (2, 16, 4)
    torch.testing.assert_close(out["latent"][:, 5], x[:, :, 2, 2])
    torch.testing.assert_close(out["latent_mean"][:, 0], x.mean((2, 3)))  # stride only affects the raw key


def test_sd_turbo_keys_token_counts_and_gradient(mae_ckpt):
    path, enc = mae_ckpt
    feats = LatentMAEFeatures(path, chunk_size=2)
    assert feats.keys == SD_TURBO_MAE_KEYS
    x = torch.randn(3, 4, 64, 64, requires_grad=True)
    out = feats(x)
    assert {k: v.shape for k, v in out.items()} == {
        "layer4_mean": (3, 1, 64), "layer4_std": (3, 1, 64), "layer4_mean_2": (3, 16, 64),
        "layer4_std_2": (3, 16, 64), "layer4_mean_4": (3, 4, 64), "layer4_std_4": (3, 4, 64),
    }
    with torch.no_grad():
        ref = enc(x)["layer4"]
    torch.testing.assert_close(out["layer4_mean"][:, 0], ref.mean((2, 3)), rtol=1e-5, atol=1e-6)
    sum(v.square().sum() for v in out.values()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in feats.parameters())


def test_chunking_does_not_change_features(mae_ckpt):
    path, _ = mae_ckpt
    x = torch.randn(5, 4, 16, 16)
    keys = ("layer2_blk2_mean", "layer3_std_2", "layer4")
    whole, chunked = LatentMAEFeatures(path, keys), LatentMAEFeatures(path, keys, chunk_size=2)
    a, b = whole(x), chunked(x)
    assert a["layer4"].shape == (5, 4, 64)
    for k in keys:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4)


def test_bf16_input_is_computed_in_fp32(mae_ckpt):
    path, _ = mae_ckpt
    feats = LatentMAEFeatures(path, ("layer4_mean", "layer3_std_2"))
    x = torch.randn(2, 4, 16, 16).bfloat16().requires_grad_()
    out = feats(x)
    ref = feats(x.detach().float())
    for k in out:
        assert out[k].dtype == torch.float32
        torch.testing.assert_close(out[k], ref[k], rtol=0, atol=0)
    out["layer4_mean"].sum().backward()
    assert x.grad.dtype == torch.bfloat16 and x.grad.abs().sum() > 0


def test_features_run_in_fp32_inside_a_mixed_precision_step(mae_ckpt):
    # The training step autocasts the generator; the encoder must still run in fp32, as the authors' does.
    path, _ = mae_ckpt
    feats = LatentMAEFeatures(path, ("layer4_mean", "layer3_std_2"))
    x = torch.randn(2, 4, 16, 16)
    ref = feats(x)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = feats(x)
    for k in out:
        torch.testing.assert_close(out[k], ref[k], rtol=0, atol=0)


def test_bad_keys_and_patch_sizes(mae_ckpt):
    path, _ = mae_ckpt
    with pytest.raises(ValueError, match=r"unknown feature keys \['layer5_mean'\]"):
        LatentMAEFeatures(path, ("layer4_mean", "layer5_mean"))
    with pytest.raises(ValueError, match="layer4_mean_4.*patch size 4"):  # layer4 of a 16x16 latent is 2x2
        LatentMAEFeatures(path, ("layer4_mean_4",))(torch.randn(1, 4, 16, 16))
    with pytest.raises(ValueError, match="latent_std_3.*patch size 3"):
        RawLatentFeatures(("latent_std_3",))(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="expects latents"):
        RawLatentFeatures()(torch.randn(4, 8, 8))


def test_registry(mae_ckpt):
    assert set(FEATURE_ENCODERS) == {"latent_mae", "teacher_unet", "vit_mae", "dino", "clip_image", "raw_latent"}
    assert isinstance(build_feature_encoder("latent_mae", checkpoint_path=mae_ckpt[0]), LatentMAEFeatures)
    assert build_feature_encoder("raw_latent", keys=("latent_mean",)).keys == ("latent_mean",)
    with pytest.raises(ValueError, match=r"unknown feature encoder 'clip'.*'latent_mae'"):
        build_feature_encoder("clip")


def test_flat_keys_keep_the_layout_that_mean_keys_lose():
    from drpo.features.raw_latent import RawLatentFeatures

    encoder = RawLatentFeatures(keys=("latent_flat", "latent_flat_2", "latent_mean"))
    x = torch.zeros(1, 4, 8, 8)
    x[:, :, :4, :4] = 1.0  # a blob in the top-left quarter
    moved = x.flip(-1)  # the same blob in the top-right quarter
    a, b = encoder(x), encoder(moved)
    assert a["latent_flat"].shape == (1, 1, 4 * 8 * 8) and a["latent_flat_2"].shape == (1, 1, 4 * 4 * 4)
    torch.testing.assert_close(a["latent_mean"], b["latent_mean"])
    assert (a["latent_flat"] - b["latent_flat"]).abs().max() == 1.0
    torch.testing.assert_close(a["latent_flat_2"], torch.nn.functional.avg_pool2d(x, 2).flatten(1).unsqueeze(1))
    with pytest.raises(ValueError, match="patch size 3"):
        RawLatentFeatures(keys=("latent_flat_3",))(x)
