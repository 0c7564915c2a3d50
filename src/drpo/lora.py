"""LoRA adapters on the generator UNet, saved in the diffusers format (spec 2.11).

A checkpoint folder holds `pytorch_lora_weights.safetensors` (keys "unet.…lora.down/up.weight", exactly what
`StableDiffusionPipeline.save_lora_weights` / `StableDiffusionXLPipeline.save_lora_weights` write, loadable with
`pipe.load_lora_weights(folder)`) and `lora_config.json` (rank, alpha, dropout, targets, kind, metadata).
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
LORA_CONFIG = "lora_config.json"
ADAPTER = "default"
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
_PIPELINES = {"sd-turbo": StableDiffusionPipeline, "sdxl-turbo": StableDiffusionXLPipeline}


def has_lora(unet: UNet2DConditionModel) -> bool:
    """Whether the UNet carries our LoRA adapter."""
    return bool(getattr(unet, "_hf_peft_config_loaded", False)) and ADAPTER in unet.peft_config


def add_lora(
    unet: UNet2DConditionModel,
    *,
    rank: int = 16,
    alpha: float = 16,
    dropout: float = 0.0,
    targets: Sequence[str] = DEFAULT_TARGETS,
) -> list[torch.nn.Parameter]:
    """Freeze the UNet and add a PEFT LoRA adapter (scale alpha / rank) on the modules named `targets`.

    Default targets are all self- and cross-attention projections. PEFT initialises A randomly (global torch
    RNG) and B to zero, so the adapted UNet starts equal to the base. Returns the trainable LoRA parameters,
    kept in float32 whatever the UNet dtype.
    """
    if has_lora(unet):
        raise ValueError("the UNet already has a LoRA adapter; use load_lora to restore weights into it")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets)))
    params = [p for name, p in unet.named_parameters() if ".lora_" in name]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def _lora_settings(config: LoraConfig) -> dict:
    return {
        "rank": config.r,
        "alpha": config.lora_alpha,
        "dropout": config.lora_dropout,
        "targets": sorted(config.target_modules),
    }


def save_lora(
    unet: UNet2DConditionModel, out_dir: str | Path, *, kind: str = "sd-turbo", metadata: dict | None = None
) -> Path:
    """Save the UNet's LoRA adapter as a diffusers LoRA folder and return its path.

    Written to a temporary sibling folder first and then renamed over `out_dir` (replacing it as a whole), so an
    interrupted job never leaves a half-written checkpoint. `metadata` (JSON-serialisable) goes to lora_config.json.
    """
    if kind not in _PIPELINES:
        raise ValueError(f"unknown generator kind {kind!r}; expected one of {tuple(_PIPELINES)}")
    if not has_lora(unet):
        raise ValueError("the UNet has no LoRA adapter to save (call add_lora first)")
    config = unet.peft_config[ADAPTER]
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=ADAPTER))
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    settings = {**_lora_settings(config), "kind": kind, "metadata": metadata or {}}

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        _PIPELINES[kind].save_lora_weights(
            tmp, unet_lora_layers=state, unet_lora_adapter_metadata=config.to_dict(), weight_name=LORA_WEIGHTS
        )
        (tmp / LORA_CONFIG).write_text(json.dumps(settings, indent=2))
        if out_dir.exists():
            old = tmp.with_name(tmp.name + ".old")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_lora(unet: UNet2DConditionModel, lora_dir: str | Path) -> None:
    """Load a folder written by `save_lora` into the UNet, adding the adapter first if it has none.

    Raises FileNotFoundError naming missing files, ValueError if the UNet already has an adapter whose rank,
    alpha or targets differ from lora_config.json, or if the weights do not match the adapter's modules.
    """
    lora_dir = Path(lora_dir)
    missing = [name for name in (LORA_WEIGHTS, LORA_CONFIG) if not (lora_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"LoRA checkpoint {lora_dir} is missing: {', '.join(missing)}")
    saved = json.loads((lora_dir / LORA_CONFIG).read_text())
    if has_lora(unet):
        current = _lora_settings(unet.peft_config[ADAPTER])
        keys = ("rank", "alpha", "targets")
        diffs = [f"{k}: saved {saved[k]} vs UNet {current[k]}" for k in keys if saved[k] != current[k]]
        if diffs:
            raise ValueError(f"LoRA checkpoint {lora_dir} does not fit the UNet's adapter ({'; '.join(diffs)})")
    else:
        add_lora(unet, rank=saved["rank"], alpha=saved["alpha"], dropout=saved["dropout"], targets=saved["targets"])

    state = load_file(lora_dir / LORA_WEIGHTS)
    foreign = sorted(k for k in state if not k.startswith("unet."))
    if foreign:
        raise ValueError(f"{lora_dir / LORA_WEIGHTS} holds non-UNet LoRA weights, e.g. {foreign[0]}")
    state = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items()})
    result = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER)
    absent = [k for k in result.missing_keys if ".lora_" in k]
    if result.unexpected_keys or absent:
        bad = (result.unexpected_keys or absent)[0]
        raise ValueError(
            f"{lora_dir / LORA_WEIGHTS} does not match the UNet's LoRA modules "
            f"({len(result.unexpected_keys)} unexpected, {len(absent)} missing keys, e.g. {bad})"
        )
