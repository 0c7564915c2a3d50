"""The asset check lists every missing model file with its path and what it is."""

import shutil

import pytest

from drpo.assets import check_assets, missing_assets


def test_tiny_models_are_complete(tiny_config):
    assert missing_assets(tiny_config) == []
    check_assets(tiny_config)


def test_every_missing_file_is_listed_with_what_it_is(tiny_config, tiny_models, tmp_path):
    generator = tmp_path / "generator"
    shutil.copytree(tiny_models["generator"], generator)
    (generator / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    shutil.rmtree(generator / "tokenizer")
    tiny_config["models"]["generator"]["path"] = str(generator)
    tiny_config["models"]["features"]["checkpoint"] = str(tmp_path / "nowhere.pth")
    tiny_config["models"]["reward"]["path"] = str(tmp_path / "no_reward")
    with pytest.raises(FileNotFoundError) as error:
        check_assets(tiny_config)
    message = str(error.value)
    assert "5 model file(s) missing" in message
    assert "unet/diffusion_pytorch_model.safetensors" in message and "SD-Turbo unet weights" in message
    assert "tokenizer/tokenizer_config.json" in message
    assert "nowhere.pth" in message and "latent-MAE" in message
    assert "no_reward/config.json" in message and "no_reward/model.safetensors" in message
