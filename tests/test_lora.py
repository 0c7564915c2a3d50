"""LoRA adapters in the diffusers format: add, save, load, and loading by diffusers itself."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open

from drpo.generators import load_generator
from drpo.lora import LORA_CONFIG, LORA_WEIGHTS, add_lora, load_lora, save_lora
from drpo.tiny import write_tiny_sd_turbo, write_tiny_sdxl_turbo

WORDS = ["a", "red", "blue", "circle", "square"]
PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "sd-turbo": write_tiny_sd_turbo(root / "sd", words=WORDS, model_max_length=12),
        "sdxl-turbo": write_tiny_sdxl_turbo(root / "sdxl", words=WORDS, model_max_length=12),
    }


def _perturb(params, seed=0, scale=0.1):
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=rng))


def test_add_lora_freezes_the_base_and_returns_fp32_trainables(folders):
    gen = load_generator(folders["sd-turbo"], dtype=torch.bfloat16)
    gen.unet.requires_grad_(True)
    params = add_lora(gen.unet, rank=4, alpha=8)
    trainable = [p for p in gen.unet.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(p) for p in trainable}
    # 4 targets x (self + cross attention) x 3 attention blocks (down, mid, up) x (A, B)
    assert len(params) == 4 * 2 * 4 * 2
    assert all(p.dtype == torch.float32 for p in params)
    assert gen.unet.conv_in.weight.dtype == torch.bfloat16
    assert gen.unet.peft_config["default"].lora_alpha == 8
    x = gen.sample(gen.encode_prompts(PROMPTS[:1]), gen.make_noise(seeds=[0]))
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        add_lora(gen.unet)


@pytest.mark.parametrize("kind", ["sd-turbo", "sdxl-turbo"])
def test_round_trip_and_diffusers_loads_our_file(folders, kind, tmp_path):
    gen = load_generator(folders[kind], kind)
    _perturb(add_lora(gen.unet, rank=4, alpha=8))
    cond = gen.encode_prompts(PROMPTS)
    z = gen.make_noise(seeds=[10, 11])
    with torch.no_grad():
        x = gen.sample(cond, z)
        base = gen.sample(cond, z, adapters=False)
    out = save_lora(gen.unet, tmp_path / "lora", kind=kind, metadata={"step": 7})

    assert sorted(p.name for p in out.iterdir()) == [LORA_CONFIG, LORA_WEIGHTS]
    settings = json.loads((out / LORA_CONFIG).read_text())
    assert settings == {
        "rank": 4,
        "alpha": 8,
        "dropout": 0.0,
        "targets": ["to_k", "to_out.0", "to_q", "to_v"],
        "kind": kind,
        "metadata": {"step": 7},
    }
    with safe_open(out / LORA_WEIGHTS, "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("unet.") and (".lora.down." in k or ".lora.up." in k) for k in keys)

    fresh = load_generator(folders[kind], kind)
    load_lora(fresh.unet, out)
    with torch.no_grad():
        torch.testing.assert_close(fresh.sample(cond, z), x, rtol=0, atol=1e-6)
        torch.testing.assert_close(fresh.sample(cond, z, adapters=False), base, rtol=0, atol=1e-6)

    # diffusers' own loader reads the file (rank and alpha from its metadata) and gives the same model.
    pipe = {"sd-turbo": StableDiffusionPipeline, "sdxl-turbo": StableDiffusionXLPipeline}[kind].from_pretrained(
        folders[kind], local_files_only=True
    )
    pipe.load_lora_weights(out)
    with torch.no_grad():
        if kind == "sd-turbo":
            eps = pipe.unet(z, 999, encoder_hidden_states=cond.hidden).sample
            expected = gen.unet(z, 999, encoder_hidden_states=cond.hidden).sample
            torch.testing.assert_close(eps, expected, rtol=1e-5, atol=1e-5)
        else:
            latents = pipe(
                PROMPTS, latents=z.clone(), num_inference_steps=1, guidance_scale=0.0, output_type="latent"
            ).images
            torch.testing.assert_close(latents, x, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(x, base)


def test_load_into_existing_adapter(folders, tmp_path):
    gen = load_generator(folders["sd-turbo"])
    _perturb(add_lora(gen.unet, rank=4, alpha=4))
    out = save_lora(gen.unet, tmp_path / "lora")
    cond, z = gen.encode_prompts(PROMPTS), gen.make_noise(seeds=[1, 2])

    same = load_generator(folders["sd-turbo"])
    add_lora(same.unet, rank=4, alpha=4)
    load_lora(same.unet, out)
    with torch.no_grad():
        torch.testing.assert_close(same.sample(cond, z), gen.sample(cond, z), rtol=0, atol=1e-6)

    other_rank = load_generator(folders["sd-turbo"])
    add_lora(other_rank.unet, rank=2, alpha=4)
    with pytest.raises(ValueError, match="rank: saved 4 vs UNet 2"):
        load_lora(other_rank.unet, out)
    other_targets = load_generator(folders["sd-turbo"])
    add_lora(other_targets.unet, rank=4, alpha=4, targets=("to_q", "to_v"))
    with pytest.raises(ValueError, match="targets"):
        load_lora(other_targets.unet, out)


def test_save_replaces_atomically_and_load_names_missing_files(folders, tmp_path):
    gen = load_generator(folders["sd-turbo"])
    params = add_lora(gen.unet, rank=2, alpha=2)
    target = tmp_path / "ckpt" / "unet_lora"
    save_lora(gen.unet, target, metadata={"step": 1})
    _perturb(params)
    save_lora(gen.unet, target, metadata={"step": 2})
    assert json.loads((target / LORA_CONFIG).read_text())["metadata"] == {"step": 2}
    with safe_open(target / LORA_WEIGHTS, "pt") as f:
        assert any(f.get_tensor(k).abs().sum() > 0 for k in f.keys() if ".lora.up." in k)

    # A save that fails half way (unserialisable metadata) leaves the previous checkpoint and no debris.
    with pytest.raises(TypeError):
        save_lora(gen.unet, target, metadata={"step": object()})
    assert [p.name for p in target.parent.iterdir()] == ["unet_lora"]
    assert json.loads((target / LORA_CONFIG).read_text())["metadata"] == {"step": 2}

    with pytest.raises(FileNotFoundError, match=f"{LORA_WEIGHTS}, {LORA_CONFIG}"):
        load_lora(gen.unet, tmp_path)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        save_lora(load_generator(folders["sd-turbo"]).unet, tmp_path / "none")
