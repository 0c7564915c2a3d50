# Evaluation of the base generator (method "base", step 0) and of every training checkpoint.


def evaluate_inputs(wildcards):
    inputs = dict(model_inputs(), prompts=test_prompts())
    # Scorers that only evaluation reads: the held-out one, and the CLIP reward when the target is the detector.
    for label in config["evaluate"]["rewards"]:
        if path := eval_reward_path(label):
            inputs[f"reward_{label}"] = path + "/config.json"
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
    params:
        config=sections("device", "models", "world", "evaluate"),
    message:
        "Evaluating {wildcards.method} seed {wildcards.seed} at step {wildcards.step}"
    resources:
        gpu=1 if config["device"] == "cuda" else 0,
    script:
        "../scripts/evaluate.py"
