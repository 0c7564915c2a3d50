# Evaluation of the base generator (method "base", step 0) and of every training checkpoint.


def evaluate_inputs(wildcards):
    done = None if wildcards.method == "base" else RUN.format(**wildcards) + "/train_done.json"
    return evaluation_inputs(config, done)


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
