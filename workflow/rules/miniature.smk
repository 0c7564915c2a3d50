# Building the miniature world's models (DESIGN.md section 3), in the real formats: a VAE, a latent MAE
# (Drifting checkpoint layout), a CLIP reward model (Hugging Face folder) and the base one-step generator
# (diffusers SD-Turbo folder). They are shipped under resources/miniature/ (these rules made them; see
# each provenance.json), so a default run skips these rules; `--forcerun miniature_generator` (etc.)
# rebuilds one, and configs/ci.yaml rebuilds all of them at tiny size.


if config["world"]["enabled"]:
    MODELS = config["models"]
    AUTOENCODER = str(Path(MODELS["generator"]["path"]).parent / "autoencoder")

    rule miniature_autoencoder:
        output:
            AUTOENCODER + "/config.json",
        log:
            f"{R}/logs/miniature_autoencoder.log",
        params:
            settings=config["miniature"],
        message:
            "Training the miniature's VAE on rendered images"
        script:
            "../scripts/miniature.py"

    rule miniature_mae:
        input:
            autoencoder=rules.miniature_autoencoder.output[0],
        output:
            MODELS["features"]["checkpoint"],
        log:
            f"{R}/logs/miniature_mae.log",
        params:
            settings=config["miniature"],
        message:
            "Training the miniature's latent MAE on VAE latents of renders"
        script:
            "../scripts/miniature.py"

    rule miniature_reward:
        output:
            MODELS["reward"]["path"] + "/config.json",
        log:
            f"{R}/logs/miniature_reward.log",
        params:
            settings=config["miniature"],
        message:
            "Training the miniature's CLIP reward model on (render, prompt) pairs"
        script:
            "../scripts/miniature.py"

    rule miniature_generator:
        input:
            autoencoder=rules.miniature_autoencoder.output[0],
            mae=rules.miniature_mae.output[0],
        output:
            MODELS["generator"]["path"] + "/model_index.json",
        log:
            f"{R}/logs/miniature_generator.log",
        params:
            settings=config["miniature"],
        message:
            "Training the miniature's base one-step generator by drifting"
        script:
            "../scripts/miniature.py"
