# Evaluation of the base generator (method "base", step 0) and of every training checkpoint.


def evaluate_inputs(wildcards):
    inputs = dict(model_inputs(), prompts=test_prompts())
    if heldout_reward_path():  # only evaluation reads the held-out scorer
        inputs["heldout_reward"] = heldout_reward_path() + "/config.json"
    if wildcards.method != "base":
        inputs["done"] = RUN.format(method=wildcards.method, seed=wildcards.seed) + "/train_done.json"
    return inputs


rule evaluate:
    input:
        unpack(evaluate_inputs),
    output:
        summary=EVAL + "/summary.json",
        images=EVAL + "/per_image.parquet",
    log:
        EVAL + "/evaluate.log",
    message:
        "Evaluating {wildcards.method} seed {wildcards.seed} at step {wildcards.step}"
    resources:
        gpu=1 if config["device"] == "cuda" else 0,
    script:
        "../scripts/evaluate.py"
