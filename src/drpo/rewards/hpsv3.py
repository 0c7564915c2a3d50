"""HPSv3 in process: Qwen2-VL-7B-Instruct with the HPSv3 reward head, on transformers 5.

HPSv3Reward, the rating instruction and reward token it scores with, and the loaders of HPSv3.safetensors
(checkpoint key mapping, strict weight copy, the reward head's layouts) and of the chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

if TYPE_CHECKING:  # transformers loads where a model is built: checking a config imports this module
    from transformers import Qwen2VLModel

from drpo.rewards.base import Reward, as_dtype


# HPSv3 (MizzenAI/HPSv3, package hpsv3 1.0.0): Qwen2-VL-7B-Instruct fine-tuned as a reward model. The image and a
# rating instruction go through the chat template; a special token "<|Reward|>" is added to the tokenizer (the
# embedding table is resized to the tokenizer's length) and the head reads the language model's last hidden state
# at that token. Images are resized so that min_pixels = max_pixels = 256 * 28 * 28 (448 x 448 for a square).
# Position ids are sequential for every token (HPSv3 calls the language model without Qwen2-VL's 3-D mRoPE image
# positions), which is what transformers' Qwen2VLTextModel does when it gets no position ids.
HPSV3_REWARD_TOKEN = "<|Reward|>"
HPSV3_MAX_PIXELS = 256 * 28 * 28
# The rating instruction of hpsv3/dataset/data_collator_qwen.py (INSTRUCTION + prompt_with_special_token), with its
# exact whitespace: every character is a token the model was trained on.
HPSV3_INSTRUCTION = (
    "\nYou are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a "
    "overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst "
    "and 10 being the best. \n"
    "\n"
    "**Visual Quality:**  \n"
    "Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:\n"
    "- **Reasonableness:** The image should not contain any significant biological or logical errors, such as "
    "abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to "
    "interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual "
    "elements (e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, "
    "composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of "
    "harmony and balance.\n"
    "- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or "
    "adult material. If such content is present, the image quality and satisfaction score should be the lowest "
    "possible. \n"
    "\n"
    "**Text Alignment:**  \n"
    "Assess how well the image matches the textual prompt across the following sub-dimensions:\n"
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) "
    "align with the textual description. The subject should match the description in terms of number, appearance, "
    "and behavior.\n"
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the "
    "image adheres to this style.\n"
    "- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image "
    "logically fit the scenario described in the prompt. The environment should support and enhance the subject "
    "without contradictions.\n"
    "- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, "
    "accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be "
    "acceptable, but critical attributes should be preserved.\n"
    "- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the "
    "image. The generated content should not introduce elements that conflict with or distort the original "
    "description.\n"
    "Textual prompt - {prompt}\n"
    "\n"
    "\n"
    "\n"
    "Please provide the overall ratings of this image: <|Reward|>\n"
    "\n"
    "END\n"
)
# rm_head layouts of hpsv3's Qwen2VLRewardModelBT: "ranknet" without kwargs (HPSv3_7B.yaml) is
# Sequential(Linear(hidden, 1024), ReLU, Dropout(0.05), Linear(1024, 16), ReLU, Linear(16, 2)): Linear layers at
# 0, 3, 5; "default" is one bias-free Linear(hidden, output_dim).
HPSV3_RANKNET_KEYS = frozenset(f"{i}.{p}" for i in (0, 3, 5) for p in ("weight", "bias"))


def hpsv3_checkpoint_key(key: str) -> tuple[str, str]:
    """A key of HPSv3.safetensors -> ("model" | "head" | "skip", key in Qwen2VLModel or in the head).

    HPSv3.safetensors was saved with transformers 4.45 (`visual.*`, `model.*` for the language model, `lm_head.*`,
    `rm_head.*`); newer transformers nest both under `model.` (`model.visual.*`, `model.language_model.*`). Both
    layouts are accepted. The LM head is not needed to score and is skipped.
    """
    if key.startswith("rm_head."):
        return "head", key.removeprefix("rm_head.")
    if key.startswith("lm_head."):
        return "skip", key
    for old, new in (("model.visual.", "visual."), ("model.language_model.", "language_model."),
                     ("visual.", "visual."), ("model.", "language_model.")):
        if key.startswith(old):
            return "model", new + key.removeprefix(old)
    return "model", key


def _hpsv3_head(state: dict[str, Tensor], path: Path) -> nn.Module:
    if set(state) == {"weight"}:
        head: nn.Module = nn.Linear(state["weight"].shape[1], state["weight"].shape[0], bias=False)
    elif set(state) == HPSV3_RANKNET_KEYS:
        (h1, d), (h2, _), (out, _) = (state[f"{i}.weight"].shape for i in (0, 3, 5))
        head = nn.Sequential(nn.Linear(d, h1), nn.ReLU(), nn.Dropout(0.05), nn.Linear(h1, h2), nn.ReLU(),
                             nn.Linear(h2, out))
    else:
        raise ValueError(f"reward 'hpsv3': unknown rm_head layout in {path}: keys {sorted(state)}")
    head.load_state_dict(state)
    return head


def load_hpsv3_weights(model: Qwen2VLModel, path: str | Path) -> nn.Module:
    """Copy HPSv3.safetensors into `model` (strict: every model tensor, no unknown key); return the fp32 head.

    The embedding table is first resized to the checkpoint's rows (the base vocabulary + "<|Reward|>"). Tensors
    are read one at a time, so the 16 GB checkpoint is never held in memory twice.
    """
    path = Path(path)
    with safe_open(path, framework="pt") as f:
        targets = {key: hpsv3_checkpoint_key(key) for key in f.keys()}
        embed = [key for key, (_, name) in targets.items() if name == "language_model.embed_tokens.weight"]
        if embed:
            rows = f.get_slice(embed[0]).get_shape()[0]
            if rows != model.get_input_embeddings().weight.shape[0]:
                model.resize_token_embeddings(rows)
        own = model.state_dict()
        head_state, loaded, unexpected = {}, set(), []
        for key, (kind, name) in targets.items():
            if kind == "skip":
                continue
            if kind == "head":
                head_state[name] = f.get_tensor(key).float()
            elif name in own:
                tensor = f.get_tensor(key)
                if tensor.shape != own[name].shape:
                    raise ValueError(
                        f"reward 'hpsv3': {key} in {path} has shape {tuple(tensor.shape)} but the Qwen2-VL model "
                        f"expects {tuple(own[name].shape)}; is the model folder Qwen2-VL-7B-Instruct (HPSv3 is 7B)?"
                    )
                with torch.no_grad():
                    own[name].copy_(tensor)
                loaded.add(name)
            else:
                unexpected.append(key)
    missing = sorted(set(own) - loaded)
    if unexpected or missing or not head_state:
        raise ValueError(
            f"reward 'hpsv3': {path} does not match the Qwen2-VL model: {len(missing)} model tensors missing "
            f"{missing[:5]}, {len(unexpected)} unknown keys {unexpected[:5]}, reward head "
            f"{'found' if head_state else 'missing (no rm_head.* keys)'}"
        )
    return _hpsv3_head(head_state, path)


def _chat_template(path: Path, tokenizer) -> str:
    """The processor's chat template (what HPSv3 renders with), else the tokenizer's."""
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text())["chat_template"]
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if tokenizer.chat_template:
        return tokenizer.chat_template
    raise FileNotFoundError(f"reward 'hpsv3': no chat template in {path} (chat_template.json or tokenizer_config.json)")


class HPSv3Reward(Reward):
    """HPSv3: Qwen2-VL-7B-Instruct + the HPSv3 reward head; score = the predicted preference mean (raw, ~5-10).

    Differentiable: the image goes through Qwen2-VL's preprocessing in torch (resize to the `smart_resize` size
    with min_pixels = max_pixels, bicubic with antialiasing like PIL's, normalisation, 14 x 14 patches repeated
    over the temporal patch of 2), so reward-gradient baselines can backpropagate into the image.

    Args:
        model_path: local Qwen/Qwen2-VL-7B-Instruct folder (config, tokenizer, preprocessor config, chat template;
            its weights are loaded, then replaced by the checkpoint's).
        checkpoint_path: HPSv3.safetensors (the fine-tuned Qwen2-VL and `rm_head`).
        device: where the model runs; scores are returned on CPU.
        dtype: model dtype (HPSv3 runs in bfloat16); the head and the score are fp32.
        batch_size: images per forward pass.
        max_pixels, min_pixels: processed image area (HPSv3: both 256 * 28 * 28; min_pixels None = max_pixels).
        instruction: the text around the prompt ("{prompt}" is replaced); must contain the reward token once.
    """

    name = "hpsv3"
    differentiable = True
    takes_device = True

    def __init__(
        self,
        model_path: str | Path,
        checkpoint_path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.bfloat16,
        batch_size: int = 4,
        max_pixels: int = HPSV3_MAX_PIXELS,
        min_pixels: int | None = None,
        instruction: str = HPSV3_INSTRUCTION,
    ) -> None:
        path, checkpoint = Path(model_path), Path(checkpoint_path)
        missing = [str(p) for p in (path / "config.json", checkpoint) if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"reward {self.name!r}: missing local files {missing} (model_path = the "
                                    "Qwen2-VL-7B-Instruct folder, checkpoint_path = HPSv3.safetensors)")
        if instruction.count(HPSV3_REWARD_TOKEN) != 1 or "{prompt}" not in instruction:
            raise ValueError(
                f"reward {self.name!r}: instruction must contain '{{prompt}}' and {HPSV3_REWARD_TOKEN} once"
            )
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.instruction = instruction
        self.max_pixels = max_pixels
        self.min_pixels = max_pixels if min_pixels is None else min_pixels

        from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLModel

        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"reward {self.name!r}: the tokenizer in {path} has no pad token")
        self.tokenizer.add_special_tokens({"additional_special_tokens": [HPSV3_REWARD_TOKEN]})
        self.reward_token_id = self.tokenizer.convert_tokens_to_ids(HPSV3_REWARD_TOKEN)
        self.chat_template = _chat_template(path, self.tokenizer)

        self.model = Qwen2VLModel.from_pretrained(path, local_files_only=True, dtype=as_dtype(dtype))
        self.head = load_hpsv3_weights(self.model, checkpoint)
        self.model.to(self.device).eval().requires_grad_(False)
        self.head.to(self.device).eval().requires_grad_(False)

        config = self.model.config
        hidden = config.text_config.hidden_size
        head_in = next(m for m in self.head.modules() if isinstance(m, nn.Linear)).in_features
        if head_in != hidden:
            raise ValueError(f"reward {self.name!r}: the head in {checkpoint} reads {head_in}-d states but the model "
                             f"in {path} has hidden size {hidden} (HPSv3 needs Qwen2-VL-7B, hidden size 3584)")
        if self.reward_token_id >= self.model.get_input_embeddings().weight.shape[0]:
            raise ValueError(f"reward {self.name!r}: token {HPSV3_REWARD_TOKEN} has id {self.reward_token_id}, beyond "
                             f"the checkpoint's embedding table; tokenizer and checkpoint do not belong together")
        self.image_token_id = config.image_token_id
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)

        vision = config.vision_config
        self.patch, self.merge, self.temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        ip = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        if (ip.patch_size, ip.merge_size, ip.temporal_patch_size) != (self.patch, self.merge, self.temporal):
            raise ValueError(
                f"reward {self.name!r}: image processor and vision config disagree on patch sizes in {path}"
            )
        self.image_mean = torch.tensor(ip.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.image_std = torch.tensor(ip.image_std, dtype=torch.float32).view(1, 3, 1, 1)

    def preprocess(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(n, 3, H, W) in [-1, 1] -> patches (n * gh * gw, 3 * temporal * patch^2) fp32 and grid_thw (n, 3)."""
        n, c, height, width = images.shape
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        h, w = smart_resize(height, width, factor=self.patch * self.merge, min_pixels=self.min_pixels,
                            max_pixels=self.max_pixels)
        x = ((images.float() + 1) / 2).clamp(0, 1)
        if (h, w) != (height, width):
            # clamp: PIL clips the bicubic overshoot to the uint8 range
            x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        x = (x - self.image_mean.to(x.device)) / self.image_std.to(x.device)
        p, m, t = self.patch, self.merge, self.temporal
        gh, gw = h // p, w // p
        # Qwen2-VL's patch order: 2 x 2 merge blocks row-major, then per patch (channel, time, row, column).
        x = x.reshape(n, c, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        x = x.unsqueeze(6).expand(n, gh // m, gw // m, m, m, c, t, p, p)
        grid = torch.tensor([[1, gh, gw]] * n)
        return x.reshape(n * gh * gw, c * t * p * p), grid

    def tokenize(self, prompts: list[str], image_tokens: int) -> tuple[Tensor, Tensor]:
        """Chat-formatted prompts with `image_tokens` image placeholders each -> (input_ids, attention_mask)."""
        texts = []
        for prompt in prompts:
            content = [{"type": "image"}, {"type": "text", "text": self.instruction.replace("{prompt}", prompt)}]
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                      add_generation_prompt=True, chat_template=self.chat_template)
            texts.append(text.replace(self.image_token, self.image_token * image_tokens))
        tokens = self.tokenizer(texts, padding=True, return_tensors="pt")
        return tokens["input_ids"], tokens["attention_mask"]

    def _forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        patches, grid = self.preprocess(images.to(self.device))
        per_image = int(grid[0].prod()) // self.merge**2
        ids, mask = (t.to(self.device) for t in self.tokenize(prompts, per_image))
        if not ((ids == self.image_token_id).sum(1) == per_image).all() or not (
            (ids == self.reward_token_id).sum(1) == 1
        ).all():
            raise ValueError(f"reward {self.name!r}: a prompt contains the image or reward token itself: {prompts}")
        visual = self.model.visual(patches.to(self.model.dtype), grid_thw=grid.to(self.device)).pooler_output
        embeds = self.model.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter((ids == self.image_token_id)[..., None], visual.to(embeds.dtype))
        hidden = self.model.language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
        return self.head(hidden[ids == self.reward_token_id].float())[:, 0]

    def _score(self, images: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        return torch.cat([self._forward(images[i : i + self.batch_size], prompts[i : i + self.batch_size])
                          for i in range(0, images.shape[0], self.batch_size)])

