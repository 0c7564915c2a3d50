"""Feature encoders of spec 2.5b-e on tiny real models: teacher U-Net, pixel ViT-MAE, DINOv2, raw-latent guard."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    BitImageProcessor,
    Dinov2Config,
    Dinov2Model,
    ViTImageProcessor,
    ViTMAEConfig,
    ViTMAEForPreTraining,
    ViTMAEModel,
)

from drpo.features import FEATURE_ENCODERS, build_feature_encoder
from drpo.features.raw_latent import RawLatentFeatures
from drpo.features.teacher_unet import TEACHER_LAYERS, TeacherUNetFeatures
from drpo.features.vit import DINO_KEYS, CLIPImageFeatures, DinoFeatures, ViTMAEFeatures
from drpo.generators import load_generator
from drpo.images import to_uint8
from drpo.lora import add_lora
from drpo.tiny import write_tiny_clip, write_tiny_sd_turbo, write_tiny_sdxl_turbo

WORDS = ["a", "red", "blue", "circle", "square"]
IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
# 16x16 latents, three U-Net levels: down_blocks.2 and mid_block are 32 x 4 x 4 (pooled to 1 x 1, D = 32),
# up_blocks.0 is 32 x 8 x 8 (pooled 4 x 4 -> 2 x 2, D = 128). Decoded images are 32 x 32.
LATENT = (4, 16, 16)
TEACHER_DIMS = {"down_blocks.2": 32, "mid_block": 32, "up_blocks.0": 128}
VIT_KEYS = ("layer2_patch_mean", "layer2_patch_std", "layer2_cls", "layer1_cls")
TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("paper_features")
    tiny = dict(words=WORDS, sample_size=16, block_out_channels=(16, 32, 32), model_max_length=16)
    torch.manual_seed(0)
    # vit-mae-base ships the pre-training model (encoder + decoder); the processor resizes 32 -> 16.
    mae = ViTMAEForPreTraining(ViTMAEConfig(image_size=16, patch_size=4, decoder_hidden_size=32,
                                            decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                                            decoder_intermediate_size=64, **TINY_VIT))
    mae.save_pretrained(root / "vit_mae")
    ViTImageProcessor(size={"height": 16, "width": 16}, resample=3, **IMAGENET).save_pretrained(root / "vit_mae")
    # dinov2-base: resize short side then center crop; the encoder resizes straight to the crop size (24).
    Dinov2Model(Dinov2Config(image_size=32, patch_size=8, **TINY_VIT)).save_pretrained(root / "dino")
    BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 24, "width": 24}, do_center_crop=True,
                      **IMAGENET).save_pretrained(root / "dino")
    return {
        "sd-turbo": write_tiny_sd_turbo(root / "sd", **tiny),
        "sdxl-turbo": write_tiny_sdxl_turbo(root / "sdxl", **tiny),
        "vit_mae": root / "vit_mae",
        "dino": root / "dino",
        # a CLIP folder as the miniature's reward is saved (processor_config.json, transformers 5's layout)
        "clip": write_tiny_clip(root / "clip", words=WORDS, image_size=16, patch_size=4),
    }


@pytest.fixture(scope="module")
def sd(folders):
    return load_generator(folders["sd-turbo"], "sd-turbo")


@pytest.fixture(scope="module")
def sdxl(folders):
    return load_generator(folders["sdxl-turbo"], "sdxl-turbo")


def _latents(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn((n, *LATENT), generator=torch.Generator().manual_seed(seed))


def _grad(features, x: torch.Tensor, **kwargs) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    x = x.clone().requires_grad_(True)
    out = features(x, **kwargs)
    sum(v.square().sum() for v in out.values()).backward()
    return out, x.grad


# ----------------------------------------------------------------------------------- teacher U-Net
@pytest.mark.parametrize("kind", ["sd-turbo", "sdxl-turbo"])
def test_teacher_matches_hooked_full_forward(kind, request):
    gen = request.getfixturevalue("sd" if kind == "sd-turbo" else "sdxl")
    cond = gen.encode_prompts(["a red circle"])
    x = _latents()
    feats = TeacherUNetFeatures(gen, noise_std=0.0)
    out, grad = _grad(feats, x, cond=cond)
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: (3, 1, d) for k, d in TEACHER_DIMS.items()}
    assert grad.abs().sum() > 0 and list(feats.parameters()) == []

    # Reference: a full U-Net forward at t = 100 with hooks of our own, pooled by hand.
    seen, calls = {}, []

    def keep(name):
        def hook(module, args, output):
            seen[name] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [gen.unet.get_submodule(k).register_forward_hook(keep(k)) for k in TEACHER_LAYERS]
    added = None
    if kind == "sdxl-turbo":
        added = {"text_embeds": cond.pooled.expand(3, -1), "time_ids": gen.time_ids.expand(3, -1)}
    with torch.no_grad():
        gen.unet(x, 100, encoder_hidden_states=cond.hidden.expand(3, -1, -1), added_cond_kwargs=added)
        for h in handles:
            h.remove()
        handles = [gen.unet.conv_out.register_forward_hook(lambda *args: calls.append(None))]
        out = feats(x, cond=cond)
    handles[0].remove()
    torch.testing.assert_close(out["down_blocks.2"][:, 0], seen["down_blocks.2"].mean((2, 3)))
    torch.testing.assert_close(out["mid_block"][:, 0], seen["mid_block"].mean((2, 3)))
    torch.testing.assert_close(out["up_blocks.0"][:, 0], F.avg_pool2d(seen["up_blocks.0"], 4).flatten(1))
    assert calls == []  # the forward stops after the last hooked block


def test_teacher_noise_seed_chunks_and_prompt_broadcast(sdxl):
    cond = sdxl.encode_prompts(["a blue square"])
    x = _latents()
    fixed = TeacherUNetFeatures(sdxl, fixed_noise_seed=7)
    a, b = fixed(x, cond=cond), fixed(x, cond=cond)
    chunked = TeacherUNetFeatures(sdxl, fixed_noise_seed=7, chunk_size=2)(x, cond=cond.repeat_interleave(3))
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    noiseless = TeacherUNetFeatures(sdxl, noise_std=0.0)(x + 0.1 * eps, cond=cond)
    for k in TEACHER_LAYERS:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
        torch.testing.assert_close(chunked[k], a[k])
        torch.testing.assert_close(noiseless[k], a[k])
    fresh = TeacherUNetFeatures(sdxl)  # the original: fresh noise on every call
    c, d = fresh(x, cond=cond), fresh(x, cond=cond)
    assert not torch.allclose(c["mid_block"], d["mid_block"])
    assert not torch.allclose(c["mid_block"], a["mid_block"])
    # Only fresh noise makes the encoder stochastic (DrPO then calls it again for its anchors).
    assert fresh.stochastic and not fixed.stochastic and not TeacherUNetFeatures(sdxl, noise_std=0.0).stochastic


def test_teacher_uses_base_weights_under_lora_and_checkpointing(folders):
    gen = load_generator(folders["sd-turbo"], "sd-turbo")  # private copy: LoRA is added below
    cond = gen.encode_prompts(["a red square"])
    x = _latents(2, seed=1)
    base_out, base_grad = _grad(TeacherUNetFeatures(gen, fixed_noise_seed=3), x, cond=cond)

    torch.manual_seed(0)
    lora = add_lora(gen.unet, rank=4, alpha=4)
    with torch.no_grad():
        for p in lora:
            p.normal_(0, 0.5)
    noise = gen.make_noise(2, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(gen.sample(cond, noise), gen.sample(cond, noise, adapters=False))

    gen.unet.enable_gradient_checkpointing()  # as a memory-saving trainer would for the trainable pass
    for own_checkpoint in (False, True):
        feats = TeacherUNetFeatures(gen, fixed_noise_seed=3, gradient_checkpointing=own_checkpoint)
        out, grad = _grad(feats, x, cond=cond)
        for k in TEACHER_LAYERS:
            torch.testing.assert_close(out[k], base_out[k])
        torch.testing.assert_close(grad, base_grad)
    assert all(p.requires_grad and p.grad is None for p in lora)
    assert gen.unet.is_gradient_checkpointing


def test_teacher_errors(sd):
    with pytest.raises(ValueError, match=r"unknown \['down_blocks.7'\].*'mid_block'"):
        TeacherUNetFeatures(sd, keys=("down_blocks.7", "mid_block"))
    with pytest.raises(ValueError, match="distinct"):
        TeacherUNetFeatures(sd, keys=("mid_block", "mid_block"))
    feats = TeacherUNetFeatures(sd)
    with pytest.raises(ValueError, match="needs the prompt conditioning"):
        feats(_latents())
    with pytest.raises(ValueError, match="2 prompt embeddings for 3 latents"):
        feats(_latents(), cond=sd.encode_prompts(["a", "red"]))


# ----------------------------------------------------------------------------------- ViT-MAE / DINOv2
def test_vit_mae_masking_default_and_disabled(sd, folders):
    x = _latents()
    masked = ViTMAEFeatures(sd, folders["vit_mae"], keys=VIT_KEYS + ("layer2_patch",))
    assert masked.mask_ratio == 0.75 and masked.image_size == (16, 16)
    torch.manual_seed(0)
    a = masked(x)
    b = masked(x)
    torch.manual_seed(0)
    c = masked(x)
    assert {k: tuple(v.shape) for k, v in a.items()} == {
        **{k: (3, 1, 32) for k in VIT_KEYS}, "layer2_patch": (3, 4, 32),  # 16 patches, 25% kept
    }
    assert not torch.allclose(a["layer2_patch_mean"], b["layer2_patch_mean"])  # a new random mask per call
    torch.testing.assert_close(a["layer2_patch_mean"], c["layer2_patch_mean"], rtol=0, atol=0)  # global RNG

    full = ViTMAEFeatures(sd, folders["vit_mae"], keys=VIT_KEYS + ("layer2_patch",), mask_ratio=0.0, chunk_size=2)
    d, e = full(x), full(x)
    assert masked.stochastic and not full.stochastic
    assert d["layer2_patch"].shape == (3, 16, 32)
    for k in d:
        torch.testing.assert_close(d[k], e[k], rtol=0, atol=0)
    torch.testing.assert_close(d["layer2_patch_mean"], d["layer2_patch"].mean(1, keepdim=True))
    # layer L is block L's output before the final LayerNorm; CLS does not depend on the patch order.
    model = ViTMAEModel.from_pretrained(folders["vit_mae"], local_files_only=True).eval()
    model.config.mask_ratio = 0.0
    with torch.no_grad():
        ref = model(pixel_values=full.preprocess(sd.decode(x)), output_hidden_states=True)
    torch.testing.assert_close(d["layer2_cls"][:, 0], ref.hidden_states[2][:, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d["layer1_cls"][:, 0], ref.hidden_states[1][:, 0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(d["layer2_cls"][:, 0], ref.last_hidden_state[:, 0], atol=1e-3)


def test_vit_preprocessing_matches_the_hf_processor(sd, folders):
    feats = ViTMAEFeatures(sd, folders["vit_mae"], keys=("layer2_cls",), mask_ratio=0.0)
    with torch.no_grad():
        images = sd.decode(_latents(2))
    pixels = to_uint8(images)  # what the processor sees
    ours = feats.preprocess(pixels.permute(0, 3, 1, 2).float() / 127.5 - 1)
    processor = ViTImageProcessor.from_pretrained(folders["vit_mae"], local_files_only=True)
    theirs = processor(images=list(pixels.numpy()), return_tensors="np")["pixel_values"]
    assert ours.shape == theirs.shape == (2, 3, 16, 16)
    # PIL resizes uint8 images (rounding), torch resizes floats: within a few grey levels.
    np.testing.assert_allclose(ours.numpy(), theirs, atol=3 / 255 / 0.225)
    assert np.abs(ours.numpy() - theirs).mean() < 1 / 255 / 0.225


@pytest.mark.parametrize("name", ["vit_mae", "dino"])
def test_image_features_gradient_reaches_latents(name, sd, folders):
    keys = VIT_KEYS if name == "vit_mae" else ("layer1_patch_mean", "layer2_patch_std", "layer2_cls")
    feats = build_feature_encoder(name, generator=sd, checkpoint_path=folders[name], keys=keys)
    out, grad = _grad(feats, _latents())
    assert all(v.shape == (3, 1, 32) and v.dtype == torch.float32 for v in out.values())
    assert grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in feats.parameters())
    assert not any(name.startswith(("vae", "unet")) for name, _ in feats.named_parameters())


def test_dino_keys_and_determinism(sd, folders):
    keys = tuple(k.replace("layer3", "layer1").replace("layer6", "layer2") for k in DINO_KEYS[:6])
    feats = DinoFeatures(sd, folders["dino"], keys=keys + ("layer2_patch",), chunk_size=2)
    assert feats.image_size == (24, 24)
    x = _latents()
    a, b = feats(x), feats(x)
    assert a["layer2_patch"].shape == (3, 9, 32)  # 24 / 8 = 3 x 3 patches
    for k in keys:
        assert a[k].shape == (3, 1, 32)
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"unknown feature keys \['layer3_patch_mean'"):
        DinoFeatures(sd, folders["dino"])  # the paper's depths 3..12 on a 2-layer model


def test_clip_image_features_read_a_clip_folder_and_are_deterministic(sd, folders):
    keys = ("layer1_patch_mean", "layer1_patch_std", "layer1_cls")
    feats = CLIPImageFeatures(sd, folders["clip"], keys=keys)
    assert feats.image_size == (16, 16)
    x = _latents().requires_grad_(True)
    a, b = feats(x), feats(x)
    for k in keys:
        assert a[k].shape == (3, 1, 32)
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    sum(v.sum() for v in a.values()).backward()
    assert x.grad.abs().sum() > 0  # the generator learns through the decoder and the vision tower


# ----------------------------------------------------------------------------------- raw latent, registry
def test_raw_latent_token_budget():
    x = torch.randn(2, 4, 64, 64)
    with pytest.raises(ValueError, match=r"4096 tokens per 64x64 latent.*8,192-point.*spatial_stride >= 2"):
        RawLatentFeatures(("latent", "latent_mean"))(x)
    assert RawLatentFeatures(("latent",), spatial_stride=2)(x)["latent"].shape == (2, 1024, 4)
    assert RawLatentFeatures(("latent",), max_latent_tokens=None)(x)["latent"].shape == (2, 4096, 4)
    assert RawLatentFeatures(("latent_mean_2",))(x)["latent_mean_2"].shape == (2, 1024, 4)  # pooled: no limit


def test_registry_and_generator_wiring(sd, folders):
    assert set(FEATURE_ENCODERS) == {"latent_mae", "teacher_unet", "vit_mae", "dino", "clip_image", "raw_latent"}
    teacher = build_feature_encoder("teacher_unet", generator=sd, keys=("mid_block",))
    assert isinstance(teacher, TeacherUNetFeatures) and teacher.keys == ("mid_block",)
    assert isinstance(build_feature_encoder("raw_latent", generator=sd), RawLatentFeatures)  # generator ignored
    with pytest.raises(ValueError, match=r"'teacher_unet' needs the generator"):
        build_feature_encoder("teacher_unet")
    with pytest.raises(ValueError, match=r"unknown feature encoder 'clip'.*'dino'.*'teacher_unet'"):
        build_feature_encoder("clip", generator=sd)
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        build_feature_encoder("vit_mae", generator=sd, checkpoint_path=folders["sd-turbo"] / "unet")
    # Encoders without a condition accept and ignore one, so a method can always pass it.
    raw = RawLatentFeatures(("latent_mean",))
    x = _latents()
    torch.testing.assert_close(raw(x, cond=sd.encode_prompts(["a"]))["latent_mean"], raw(x)["latent_mean"])
