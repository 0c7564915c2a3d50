"""One-step generators and the tiny diffusers folders they load from (tiny random models, CPU)."""

import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import AutoTokenizer, CLIPTokenizer

from drpo.generators import PromptEmbedding, image_seed, load_generator
from drpo.images import to_uint8
from drpo.lora import add_lora
from drpo.tiny import build_clip_tokenizer, write_tiny_sd_turbo, write_tiny_sdxl_turbo

WORDS = ["a", "red", "green", "blue", "circle", "square", "left", "of"]
PROMPTS = ["a red circle", "a blue square left of a green circle"]
PIPELINES = {"sd-turbo": StableDiffusionPipeline, "sdxl-turbo": StableDiffusionXLPipeline}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "sd-turbo": write_tiny_sd_turbo(root / "sd", words=WORDS, model_max_length=16),
        "sdxl-turbo": write_tiny_sdxl_turbo(root / "sdxl", words=WORDS, model_max_length=16),
    }


def test_tokenizer_makes_each_word_one_token(tmp_path):
    words = ["ab", "abc", "bc", "Triangle", "rouge-vif"]
    build_clip_tokenizer(words, tmp_path, model_max_length=12)
    assert {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in tmp_path.iterdir()
    }
    tok = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    for word in ["ab", "abc", "bc", "triangle", "rouge", "vif"]:
        assert tok.tokenize(word) == [word + "</w>"]
    assert tok.tokenize("rouge-vif") == ["rouge</w>", "-</w>", "vif</w>"]
    # Unknown words fall back to characters and still decode.
    assert tok.tokenize("zq") == ["z", "q</w>"]
    ids = tok("abc zq")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "abc zq"
    assert tok.model_max_length == 12
    auto = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert auto("abc zq")["input_ids"] == ids
    # The classic vocab.json + merges.txt pair alone (the original SD-Turbo layout) gives the same tokenizer.
    (tmp_path / "tokenizer.json").unlink()
    assert CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)("abc zq")["input_ids"] == ids


def test_sd_turbo_constants_are_the_plain_sd2_schedule(folders):
    gen = load_generator(folders["sd-turbo"])
    assert tuple(round(c, 4) for c in gen.constants) == (0.0683, 0.9977, 0.9996, 0.0292)
    assert gen.timestep == 999


def test_sd_turbo_sample_is_the_spec_projection(folders):
    gen = load_generator(folders["sd-turbo"])
    cond = gen.encode_prompts(PROMPTS[:1]).repeat_interleave(2)
    z = gen.make_noise(seeds=[0, 1])
    with torch.no_grad():
        eps = gen.unet(z, 999, encoder_hidden_states=cond.hidden).sample
        x = gen.sample(cond, z)
    expected = 0.9996 * (z - 0.9977 * eps) / 0.0683 + 0.0292 * eps
    torch.testing.assert_close(x, expected, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("kind", ["sd-turbo", "sdxl-turbo"])
def test_encode_prompts_match_diffusers(folders, kind):
    gen = load_generator(folders[kind], kind)
    cond = gen.encode_prompts(PROMPTS)
    pipe = PIPELINES[kind].from_pretrained(folders[kind], local_files_only=True)
    with torch.no_grad():
        if kind == "sd-turbo":
            hidden, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
            assert cond.pooled is None
        else:
            hidden, _, pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
            torch.testing.assert_close(cond.pooled, pooled)
    assert cond.hidden.shape == (2, 16, 32 if kind == "sd-turbo" else 64)
    torch.testing.assert_close(cond.hidden, hidden)


def test_sdxl_sample_matches_the_diffusers_pipeline(folders):
    gen = load_generator(folders["sdxl-turbo"], "sdxl-turbo")
    z = gen.make_noise(seeds=[3, 4])
    x = gen.sample(gen.encode_prompts(PROMPTS), z)
    pipe = StableDiffusionXLPipeline.from_pretrained(folders["sdxl-turbo"], local_files_only=True)
    expected = pipe(
        PROMPTS, latents=z.clone(), num_inference_steps=1, guidance_scale=0.0, output_type="latent"
    ).images
    assert gen.init_noise_sigma == pytest.approx(14.6146, abs=1e-3)
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["sd-turbo", "sdxl-turbo"])
def test_sample_shapes_determinism_and_broadcast(folders, kind):
    gen = load_generator(folders[kind], kind)
    assert gen.latent_shape == (4, 8, 8) and gen.resolution == 16
    one = gen.encode_prompts(PROMPTS[:1])
    z = gen.make_noise(3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = gen.sample(one, z)
        assert x.shape == (3, 4, 8, 8) and x.dtype == torch.float32
        torch.testing.assert_close(gen.sample(one.repeat_interleave(3), z), x)
        assert torch.equal(gen.sample(one, z), x)
        assert not torch.allclose(x[0], x[1])
        both = gen.sample(gen.encode_prompts(PROMPTS)[1], z[:1])
        torch.testing.assert_close(both, gen.sample(gen.encode_prompts(PROMPTS[1:]), z[:1]))
    with pytest.raises(ValueError, match="prompt embeddings"):
        gen.sample(gen.encode_prompts(PROMPTS), z)
    with pytest.raises(ValueError, match="noise shape"):
        gen.sample(one, torch.zeros(1, 4, 4, 4))


@pytest.mark.parametrize("kind", ["sd-turbo", "sdxl-turbo"])
def test_base_model_is_the_unet_with_adapters_off(folders, kind):
    gen = load_generator(folders[kind], kind)
    cond = gen.encode_prompts(PROMPTS)
    z = gen.make_noise(seeds=[1, 2])
    with torch.no_grad():
        before = gen.sample(cond, z)
    params = add_lora(gen.unet, rank=4, alpha=4)
    with torch.no_grad():
        torch.testing.assert_close(gen.sample(cond, z), before)  # LoRA B starts at zero
        gen_rng = torch.Generator().manual_seed(0)
        for p in params:
            p.add_(0.1 * torch.randn(p.shape, generator=gen_rng))

    base = gen.sample(cond, z, adapters=False)
    assert base.grad_fn is None
    assert torch.equal(base, before)
    assert all(p.requires_grad for p in params)  # disabling adapters must not freeze LoRA for training

    x = gen.sample(cond, z)
    assert (x - before).abs().max() > 1e-3
    x.square().mean().backward()
    assert all(p.grad is not None for p in params)
    assert sum(p.grad.abs().sum() for p in params) > 0
    assert all(p.grad is None for n, p in gen.unet.named_parameters() if ".lora_" not in n)


def test_decode_range_chunks_gradient_and_uint8(folders):
    gen = load_generator(folders["sd-turbo"])
    with torch.no_grad():
        latents = gen.sample(gen.encode_prompts(PROMPTS[:1]), gen.make_noise(seeds=[5, 6, 7]))
    latents.requires_grad_(True)
    images = gen.decode(latents)
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    torch.testing.assert_close(gen.decode(latents, chunk_size=2), images)
    images.sum().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0

    pixels = to_uint8(torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(2, 3, 2, 2))
    assert pixels.dtype == torch.uint8 and pixels.shape == (2, 2, 2, 3)
    assert pixels[0, 0, 0].tolist() == [0, 128, 255]


def test_seeded_noise_is_reproducible_and_batch_independent(folders):
    gen = load_generator(folders["sd-turbo"])
    assert image_seed(42, 7) == 42_000_007
    seeds = [image_seed(42, i) for i in range(3)]
    batch = gen.make_noise(seeds=seeds)
    assert batch.shape == (3, 4, 8, 8)
    assert torch.equal(gen.make_noise(seeds=seeds[2:]), batch[2:])
    assert torch.equal(gen.make_noise(seeds=[seeds[1], seeds[0]]), batch[[1, 0]])
    assert not torch.equal(batch[0], batch[1])
    a = gen.make_noise(2, generator=torch.Generator().manual_seed(9))
    b = gen.make_noise(2, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="exactly one"):
        gen.make_noise(2)


def test_missing_pieces_are_all_named(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="text_encoder_2/, tokenizer_2/"):
        load_generator(folders["sd-turbo"], "sdxl-turbo")
    broken = shutil.copytree(folders["sd-turbo"], tmp_path / "broken")
    shutil.rmtree(broken / "text_encoder")
    (broken / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_generator(broken)
    assert "text_encoder/" in str(err.value) and "scheduler/scheduler_config.json" in str(err.value)
    assert str(broken) in str(err.value)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_generator(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown generator kind"):
        load_generator(folders["sd-turbo"], "flux")


def test_loaded_parts_are_frozen_and_resolution_sets_latent_size(folders):
    gen = load_generator(folders["sdxl-turbo"], "sdxl-turbo", resolution=32)
    assert gen.latent_shape == (4, 16, 16)
    assert gen.time_ids.tolist() == [[32, 32, 0, 0, 32, 32]]
    modules = [gen.unet, gen.vae, *gen.text_encoders]
    assert not any(p.requires_grad for m in modules for p in m.parameters())
    assert not any(m.training for m in modules)
    x = gen.sample(gen.encode_prompts(PROMPTS[:1]), gen.make_noise(seeds=[0]))
    assert x.shape == (1, 4, 16, 16)


def test_prompt_embedding_indexing():
    emb = PromptEmbedding(torch.arange(6.0).view(3, 2, 1), torch.arange(3.0).view(3, 1))
    assert len(emb[1]) == 1 and emb[-1].pooled.item() == 2.0
    assert emb[[2, 0]].hidden[:, 0, 0].tolist() == [4.0, 0.0]
    rep = emb[:2].repeat_interleave(2)
    assert rep.pooled.flatten().tolist() == [0.0, 0.0, 1.0, 1.0]
