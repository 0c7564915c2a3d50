# Offline gradient synthesis (method spec section 7): the preference dataset of the offline methods, written by
# the miniature world from its training prompts (in the authors' JSONL or Pick-a-Pic v2's Parquet layout) or named
# by preferences.path, and its VAE latents, encoded once into a cache beside the runs. The cache's chunks are not
# declared outputs: Snakemake would delete them with a failed job, and a rerun continues after them; done.json is
# written last.


if config["world"]["enabled"]:

    rule world_preferences_jsonl:
        input:
            unpack(lambda wildcards: model_inputs() if config["preferences"]["world"]["kind"] == "generated" else {}),
            prompts=train_prompts(),
        output:
            world_preference_dataset("jsonl"),
        log:
            f"{R}/logs/world_preferences_jsonl.log",
        params:
            config=world_preference_settings(),
        message:
            f"Writing the world's preference dataset ({config['preferences']['world']['kind']}) as the authors' JSONL"
        script:
            "../scripts/world_preferences.py"

    rule world_preferences_pickapic:
        input:
            unpack(lambda wildcards: model_inputs() if config["preferences"]["world"]["kind"] == "generated" else {}),
            prompts=train_prompts(),
        output:
            directory(world_preference_dataset("pickapic")),
        log:
            f"{R}/logs/world_preferences_pickapic.log",
        params:
            config=world_preference_settings(),
        message:
            f"Writing the world's preference dataset ({config['preferences']['world']['kind']}) in Pick-a-Pic's layout"
        script:
            "../scripts/world_preferences.py"


rule preference_latents:
    input:
        unpack(preference_inputs),
    output:
        done=PREFERENCE_CACHE + "/done.json",
    log:
        f"{R}/logs/preference_latents.log",
    params:
        dataset=preference_dataset(),
        config={"device": config["device"], "models": {"generator": config["models"]["generator"]},
                "preferences": {k: v for k, v in config["preferences"].items() if k != "world"}},
    message:
        "Encoding the preference dataset's images with the generator's VAE (a cache; a rerun continues)"
    resources:
        gpu=1 if config["device"] == "cuda" else 0,
    script:
        "../scripts/preference_latents.py"
