"""Paper-scale rewards on tiny stand-ins of the same class and file layout: aesthetic, HPSv3, GenEval-lite, configs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from tokenizers import pre_tokenizers
from transformers import CLIPModel, CLIPProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLModel
from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from drpo.rewards import (
    AestheticReward,
    EnsembleReward,
    GenEvalLiteReward,
    HPSv3Reward,
    build_reward_from_config,
)
from drpo.rewards.clip import aesthetic_mlp
from drpo.rewards.hpsv3 import HPSV3_INSTRUCTION
from drpo.tiny import write_tiny_clip
from drpo.world.prompts import all_prompts
from drpo.world.render import render, render_negative
from drpo.world.spec import WorldSpec

WORDS = ["a", "red", "blue", "circle", "square"]
PROMPTS = ["a red circle", "a blue square", "a red square"]


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Images in [-1, 1] that are exactly representable as uint8."""
    pixels = torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed))
    return pixels.float() / 127.5 - 1


def _pil(images: torch.Tensor) -> list[Image.Image]:
    pixels = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(p) for p in pixels]


# ---------------------------------------------------------------------------------------------- aesthetic
@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("clip"), words=WORDS, projection_dim=16)


def _write_head(path: Path, in_features: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = {f"layers.{k}": v for k, v in aesthetic_mlp(in_features).state_dict().items()}
    torch.save(state, path)
    return state


def test_aesthetic_is_the_affine_mlp_on_the_normalised_clip_embedding(clip_dir, tmp_path):
    state = _write_head(tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    assert sorted(state) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    reward = AestheticReward(clip_dir, tmp_path / "sac+logos+ava1-l14-linearMSE.pth", batch_size=2)
    assert reward.report_scale == 1.0 and reward.differentiable
    images = _images(3)
    scores = reward.score(images, PROMPTS)

    # Reference: HF processor on PIL images, CLIP image features, L2 norm, then the five affine layers in order.
    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    inputs = CLIPProcessor.from_pretrained(clip_dir, local_files_only=True)(images=_pil(images), return_tensors="pt")
    with torch.no_grad():
        x = F.normalize(model.get_image_features(**inputs).pooler_output, dim=-1)
    for i in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    torch.testing.assert_close(scores, x.squeeze(-1), rtol=1e-4, atol=1e-5)

    images.requires_grad_()
    reward.score(images, PROMPTS, with_grad=True).sum().backward()
    assert images.grad.abs().sum() > 0 and all(p.grad is None for p in reward.head.parameters())


def test_aesthetic_loading_errors(clip_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no head checkpoint"):
        AestheticReward(clip_dir, tmp_path / "missing.pth")
    _write_head(tmp_path / "wide.pth", in_features=768)
    with pytest.raises(ValueError, match=r"takes 768-d embeddings but the CLIP model gives 16-d"):
        AestheticReward(clip_dir, tmp_path / "wide.pth")
    state = _write_head(tmp_path / "renamed.pth")
    torch.save({k.replace("layers.7", "layers.8"): v for k, v in state.items()}, tmp_path / "renamed.pth")
    with pytest.raises(ValueError, match="is not the LAION aesthetic MLP"):
        AestheticReward(clip_dir, tmp_path / "renamed.pth")


# ---------------------------------------------------------------------------------------------- HPSv3
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL-7B-Instruct's template, reduced to what HPSv3 uses: default system turn, image, text, generation prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PATCH, MERGE = 4, 2
MAX_PIXELS = 16 * 16  # 16 x 16 images: 4 x 4 patches of 4 px, merged 2 x 2 into 4 visual tokens


def _tiny_qwen2_vl(seed: int, vocab_size: int, ids: dict[str, int]) -> Qwen2VLModel:
    """A random Qwen2-VL with every size written out (transformers 5's defaults are the 72B model)."""
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, hidden_act="silu", max_position_embeddings=4096,
                         rms_norm_eps=1e-6, use_sliding_window=False, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, hidden_act="quick_gelu",
                           in_channels=3, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(config)


def _write_hpsv3_checkpoint(path: Path, model: Qwen2VLForConditionalGeneration, head: torch.nn.Module,
                            legacy_keys: bool = True) -> dict[str, torch.Tensor]:
    """HPSv3.safetensors: the whole reward model; `legacy_keys` = transformers 4.45 names (visual.*, model.*)."""
    state = {}
    for key, value in model.state_dict().items():
        if legacy_keys:
            key = key.replace("model.visual.", "visual.").replace("model.language_model.", "model.")
        state[key] = value.clone()
    state |= {f"rm_head.{k}": v.clone() for k, v in head.state_dict().items()}
    save_file(state, path)
    return state


def _ranknet_head(hidden: int = 32) -> torch.nn.Sequential:
    torch.manual_seed(2)
    return torch.nn.Sequential(torch.nn.Linear(hidden, 8), torch.nn.ReLU(), torch.nn.Dropout(0.05),
                               torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


@pytest.fixture(scope="module")
def hpsv3_files(tmp_path_factory) -> dict:
    """A Qwen2-VL-7B-Instruct-layout folder (random tiny model) and an HPSv3.safetensors for it."""
    root = tmp_path_factory.mktemp("hpsv3")
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ["<|endoftext|>", *SPECIALS]}
    folder = root / "Qwen2-VL-7B-Instruct"
    _tiny_qwen2_vl(0, vocab_size=len(tokenizer) + 8, ids=ids).save_pretrained(folder)  # padded vocab, as Qwen's
    tokenizer.save_pretrained(folder)
    Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2).save_pretrained(folder)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))

    # The fine-tuned model: other weights, embeddings resized to the tokenizer + "<|Reward|>".
    tuned = _tiny_qwen2_vl(1, vocab_size=len(tokenizer) + 1, ids=ids)
    head = _ranknet_head()
    state = _write_hpsv3_checkpoint(root / "HPSv3.safetensors", tuned, head)
    return {"root": root, "folder": folder, "checkpoint": root / "HPSv3.safetensors", "state": state,
            "tuned": tuned, "head": head}


@pytest.fixture(scope="module")
def hpsv3(hpsv3_files) -> HPSv3Reward:
    return HPSv3Reward(hpsv3_files["folder"], hpsv3_files["checkpoint"], dtype="float32", batch_size=2,
                       max_pixels=MAX_PIXELS)


def test_hpsv3_loads_the_checkpoint_over_the_base_model(hpsv3, hpsv3_files):
    own = hpsv3.model.state_dict()
    state = hpsv3_files["state"]
    torch.testing.assert_close(own["visual.patch_embed.proj.weight"], state["visual.patch_embed.proj.weight"])
    torch.testing.assert_close(own["language_model.layers.1.mlp.up_proj.weight"],
                               state["model.layers.1.mlp.up_proj.weight"])
    assert own["language_model.embed_tokens.weight"].shape[0] == len(hpsv3.tokenizer)
    assert hpsv3.tokenizer.convert_ids_to_tokens(hpsv3.reward_token_id) == "<|Reward|>"
    torch.testing.assert_close(hpsv3.head[5].weight, hpsv3_files["head"][5].weight)
    # The current transformers layout (model.visual.*, model.language_model.*) loads to the same weights.
    _write_hpsv3_checkpoint(hpsv3_files["root"] / "new.safetensors", hpsv3_files["tuned"], hpsv3_files["head"],
                            legacy_keys=False)
    again = HPSv3Reward(hpsv3_files["folder"], hpsv3_files["root"] / "new.safetensors", dtype="float32",
                        max_pixels=MAX_PIXELS)
    for key, value in again.model.state_dict().items():
        torch.testing.assert_close(value, own[key])


def test_hpsv3_preprocess_matches_the_qwen2_vl_image_processor(hpsv3):
    processor = Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2)
    size = {"shortest_edge": MAX_PIXELS, "longest_edge": MAX_PIXELS}
    images = _images(2, size=16)  # already the processed size: exact
    ref = processor(_pil(images), size=size, return_tensors="pt")
    patches, grid = hpsv3.preprocess(images)
    torch.testing.assert_close(patches, ref["pixel_values"], rtol=1e-5, atol=1e-5)
    assert grid.tolist() == ref["image_grid_thw"].tolist() == [[1, 4, 4]] * 2

    smooth = F.interpolate(_images(2, size=8), size=40, mode="bilinear")  # resized to 16 x 16 (PIL vs torch bicubic)
    ref = processor(_pil(smooth), size=size, return_tensors="pt")
    patches, grid = hpsv3.preprocess(((smooth + 1) * 127.5).round() / 127.5 - 1)
    assert grid.tolist() == ref["image_grid_thw"].tolist()
    assert (patches - ref["pixel_values"]).abs().mean() < 0.02  # (1 / 255) / 0.27 is one uint8 step


def _reference_hpsv3(reward: HPSv3Reward, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """transformers' own Qwen2VLModel.forward (image features merged at the placeholder tokens), sequential
    positions as HPSv3 uses, pixel values from the Qwen2-VL image processor; then the head at "<|Reward|>"."""
    processor = Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2)
    vision = processor(_pil(images), size={"shortest_edge": MAX_PIXELS, "longest_edge": MAX_PIXELS},
                       return_tensors="pt")
    scores = []
    for i, prompt in enumerate(prompts):
        messages = [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": HPSV3_INSTRUCTION.replace("{prompt}", prompt)}]}]
        text = reward.tokenizer.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, tokenize=False,
                                                    add_generation_prompt=True)
        assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
        assert f"Textual prompt - {prompt}\n" in text and text.endswith("END\n<|im_end|>\n<|im_start|>assistant\n")
        ids = reward.tokenizer(text.replace("<|image_pad|>", "<|image_pad|>" * 4), return_tensors="pt").input_ids
        positions = torch.arange(ids.shape[1]).expand(3, 1, -1)
        with torch.no_grad():
            hidden = reward.model(input_ids=ids, pixel_values=vision["pixel_values"][16 * i:16 * (i + 1)],
                                  image_grid_thw=vision["image_grid_thw"][i:i + 1],
                                  position_ids=positions).last_hidden_state
            scores.append(reward.head(hidden[ids == reward.reward_token_id])[0, 0])
    return torch.stack(scores)


def test_hpsv3_score_matches_transformers_forward(hpsv3):
    images = _images(3, size=16, seed=1)
    prompts = ["a red circle", "a blue square on a much longer prompt", "x"]  # different lengths: right padding
    scores = hpsv3.score(images, prompts)
    assert scores.shape == (3,) and scores.std() > 0
    torch.testing.assert_close(scores, _reference_hpsv3(hpsv3, images, prompts), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hpsv3.score(images[[2, 0, 1]], [prompts[i] for i in (2, 0, 1)]), scores[[2, 0, 1]],
                               rtol=1e-4, atol=1e-5)


def test_hpsv3_is_differentiable(hpsv3):
    images = _images(2, size=24, seed=2).requires_grad_()  # resized to 16 x 16 inside
    assert not hpsv3.score(images, PROMPTS[:2]).requires_grad
    hpsv3.score(images, PROMPTS[:2], with_grad=True).sum().backward()
    assert images.grad.abs().sum() > 0
    assert all(p.grad is None for p in [*hpsv3.model.parameters(), *hpsv3.head.parameters()])


def test_hpsv3_instruction_keeps_the_original_whitespace():
    assert HPSV3_INSTRUCTION.startswith("\nYou are tasked with evaluating a generated image")
    assert "with 0 being the worst and 10 being the best. \n\n**Visual Quality:**  \n" in HPSV3_INSTRUCTION
    assert HPSV3_INSTRUCTION.endswith("Textual prompt - {prompt}\n\n\n\nPlease provide the overall ratings of this "
                                      "image: <|Reward|>\n\nEND\n")


def test_hpsv3_loading_errors(hpsv3_files, tmp_path):
    folder, state = hpsv3_files["folder"], hpsv3_files["state"]
    with pytest.raises(FileNotFoundError, match="missing local files"):
        HPSv3Reward(folder, tmp_path / "HPSv3.safetensors")
    save_file(state | {"model.extra.weight": torch.zeros(1)}, tmp_path / "extra.safetensors")
    with pytest.raises(ValueError, match=r"1 unknown keys \['model.extra.weight'\]"):
        HPSv3Reward(folder, tmp_path / "extra.safetensors", dtype="float32")
    save_file({k: v for k, v in state.items() if k != "model.norm.weight"}, tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match=r"1 model tensors missing \['language_model.norm.weight'\]"):
        HPSv3Reward(folder, tmp_path / "partial.safetensors", dtype="float32")
    save_file({k: v for k, v in state.items() if not k.startswith("rm_head.")}, tmp_path / "headless.safetensors")
    with pytest.raises(ValueError, match=r"reward head missing \(no rm_head"):
        HPSv3Reward(folder, tmp_path / "headless.safetensors", dtype="float32")
    wide = {k: v for k, v in state.items() if not k.startswith("rm_head.")}
    wide |= {f"rm_head.{k}": v for k, v in _ranknet_head(hidden=48).state_dict().items()}
    save_file(wide, tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match=r"reads 48-d states but the model .* has hidden size 32.*Qwen2-VL-7B"):
        HPSv3Reward(folder, tmp_path / "wide.safetensors", dtype="float32")


# ---------------------------------------------------------------------------------------------- GenEval-lite
def test_geneval_lite_judges_rendered_images():
    spec = WorldSpec()
    rng = np.random.default_rng(0)
    rows = [row for row in all_prompts(spec) if row["tag"] == "colors"][:2]
    pixels = np.stack([render(rows[0], rng, spec), render_negative(rows[0], rng, spec, "wrong_color")[0],
                       render(rows[1], rng, spec)])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    reward = GenEvalLiteReward(spec.to_dict())
    prompts = [rows[0]["prompt"], rows[0]["prompt"], rows[1]["prompt"]]
    assert reward.score(images, prompts, [rows[0], rows[0], rows[1]]).tolist() == [1.0, 0.0, 1.0]
    grouped = reward.score_groups(images[:2][None], [rows[0]["prompt"]], [rows[0]])
    assert grouped.tolist() == [[1.0, 0.0]]

    with pytest.raises(ValueError, match="reward 'geneval_lite' needs metadata"):
        reward.score(images, prompts)
    with pytest.raises(ValueError, match=r"'geneval_lite': metadata row 1 is for .*, not 'a photo'"):
        reward.score(images[:2], [rows[0]["prompt"], "a photo"], [rows[0], rows[0]])
    with pytest.raises(ValueError, match="'geneval_lite' is not differentiable"):
        reward.score(images, prompts, [rows[0], rows[0], rows[1]], with_grad=True)
    # path: null (config.yaml's reward path switched off by an overlay) builds the model-free reward
    assert isinstance(build_reward_from_config({"name": "geneval_lite", "path": None}), GenEvalLiteReward)


# ---------------------------------------------------------------------------------------------- configs
def test_build_reward_from_config(clip_dir, tmp_path):
    _write_head(tmp_path / "head.pth")
    aesthetic = build_reward_from_config({"name": "aesthetic", "path": str(clip_dir), "head_path": tmp_path / "head.pth"})
    assert isinstance(aesthetic, AestheticReward)

    ensemble = build_reward_from_config({"ensemble": {
        "aesthetic": {"weight": 3, "path": clip_dir, "head_path": tmp_path / "head.pth"},
        "ps": {"name": "pickscore", "weight": 1.0, "model_path": clip_dir},
        "geneval_lite": {"weight": 1},
    }})
    assert isinstance(ensemble, EnsembleReward) and ensemble.weights == {"aesthetic": 3.0, "ps": 1.0, "geneval_lite": 1.0}
    assert ensemble.rewards["ps"].name == "pickscore" and ensemble.requires_metadata and not ensemble.differentiable

    for bad, message in [
        ({"ensemble": {"pickscore": {"path": clip_dir}}}, "member 'pickscore': needs a numeric 'weight'"),
        ({"ensemble": {"pickscore": {"weight": 1}}, "device": "cpu"}, "an ensemble is"),
        ({"name": "pickscore", "path": clip_dir, "model_path": clip_dir}, "give 'path' or 'model_path', not both"),
        ({"path": clip_dir}, "needs a 'name'"),
        ({"name": "hpsv9"}, "unknown reward 'hpsv9'"),
    ]:
        with pytest.raises(ValueError, match=message):
            build_reward_from_config(bad)
