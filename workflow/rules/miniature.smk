# Building the miniature world's models (DESIGN.md section 3), in the real formats: a VAE, a latent MAE
# (Drifting checkpoint layout), a CLIP reward model (Hugging Face folder), the base one-step generator
# (diffusers SD-Turbo folder) and a second, independently trained CLIP scorer that evaluation scores as a
# held-out reward. They are shipped under resources/miniature/ (these rules made them; see each
# provenance.json). A rule exists only for a model that is missing, or for all of them with
# miniature.rebuild: true. ancient() inputs would not keep a fresh clone from rebuilding them: checkout order sets
# the files' times, and Snakemake's code trigger reruns a rule whose script is newer than its output (on a fresh
# clone with always-defined rules and ancient() inputs, `snakemake -n` planned three of the five models).
# configs/ci.yaml builds all five at tiny size.


def build_rule_wanted(path):
    return config["miniature"]["rebuild"] or not Path(path).exists()


if config["world"]["enabled"]:
    MODELS = config["models"]
    AUTOENCODER = str(Path(MODELS["generator"]["path"]).parent / "autoencoder")

if config["world"]["enabled"] and build_rule_wanted(AUTOENCODER + "/config.json"):

    rule miniature_autoencoder:
        output:
            AUTOENCODER + "/config.json",
        log:
            f"{R}/logs/miniature_autoencoder.log",
        params:
            config=sections("device", "world", "miniature"),
        message:
            "Training the miniature's VAE on rendered images"
        script:
            "../scripts/miniature.py"


if config["world"]["enabled"] and build_rule_wanted(MODELS["features"]["checkpoint"]):

    rule miniature_mae:
        input:
            autoencoder=AUTOENCODER + "/config.json",
        output:
            MODELS["features"]["checkpoint"],
        log:
            f"{R}/logs/miniature_mae.log",
        params:
            config=sections("device", "world", "miniature"),
        message:
            "Training the miniature's latent MAE on VAE latents of renders"
        script:
            "../scripts/miniature.py"


# The miniature's CLIP reward is built where the target reward reads it or, when the target needs no model
# folder (geneval_lite, the default target; an ensemble), where evaluation reads it as
# evaluate.rewards.pickscore.
REWARD_PATH = None
if config["world"]["enabled"]:
    REWARD_PATH = config["models"]["reward"].get("path") or eval_reward_path(config, "pickscore")
if REWARD_PATH and build_rule_wanted(REWARD_PATH + "/config.json"):

    rule miniature_reward:
        output:
            REWARD_PATH + "/config.json",
        log:
            f"{R}/logs/miniature_reward.log",
        params:
            config=sections("device", "world", "miniature"),
        message:
            "Training the miniature's CLIP reward model on (render, prompt) pairs"
        script:
            "../scripts/miniature.py"


# The held-out scorer is built where evaluation reads it, evaluate.rewards.heldout.path (eval_reward_path
# in common.smk), not at a folder derived from the generator's as AUTOENCODER is: the rule's output is then
# the very file the evaluate rule depends on (model_inputs) wherever a config puts it, and there is no rule
# when no held-out scorer is configured (paper presets: heldout: null).
HELDOUT_REWARD = eval_reward_path(config, "heldout")

if HELDOUT_REWARD and build_rule_wanted(HELDOUT_REWARD + "/config.json"):

    rule miniature_heldout_reward:
        output:
            HELDOUT_REWARD + "/config.json",
        log:
            f"{R}/logs/miniature_heldout_reward.log",
        params:
            config=sections("device", "world", "miniature"),
        message:
            "Training the miniature's held-out CLIP scorer (own seed and architecture) on (render, prompt) pairs"
        script:
            "../scripts/miniature.py"


if config["world"]["enabled"] and build_rule_wanted(MODELS["generator"]["path"] + "/model_index.json"):

    rule miniature_generator:
        input:
            autoencoder=AUTOENCODER + "/config.json",
            mae=MODELS["features"]["checkpoint"],
        output:
            MODELS["generator"]["path"] + "/model_index.json",
        log:
            f"{R}/logs/miniature_generator.log",
        params:
            config=sections("device", "world", "miniature"),
        message:
            f"Training the miniature's base one-step generator ({config['miniature']['generator'].get('recipe', 'distillation')})"
        script:
            "../scripts/miniature.py"


# The miniature's judge (rule judge, judge.smk): a random tiny Qwen2-VL, built where judge.model names it. It is not
# shipped under resources/miniature/: it takes seconds to build, and the default run has no judge stage.
JUDGE_MODEL = config["judge"]["model"] if config["world"]["enabled"] else None

if JUDGE_MODEL and build_rule_wanted(JUDGE_MODEL + "/config.json"):

    rule miniature_judge:
        output:
            JUDGE_MODEL + "/config.json",
        log:
            f"{R}/logs/miniature_judge.log",
        params:
            config=sections("device", "world", "miniature"),
        message:
            "Building the miniature's judge (a random tiny Qwen2-VL: it runs the judge stage, it judges nothing)"
        script:
            "../scripts/miniature.py"
