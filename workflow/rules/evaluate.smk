# Evaluation of the base generator (method "base", step 0) and of every training checkpoint.


def evaluate_inputs(wildcards):
    inputs = dict(model_inputs(), prompts=test_prompts())
    for label in config["evaluate"]["rewards"]:  # scorers that only evaluation reads (held-out, or the CLIP
        if eval_reward_path(label):  # reward when the target is the detector)
            inputs[f"reward_{label}"] = eval_reward_path(label) + "/config.json"
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
