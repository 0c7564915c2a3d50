# Online training, one job per (method, seed). Checkpoints are written inside the run folder but
# are not declared outputs: Snakemake deletes the outputs of a failed job, and a rerun must find
# them to resume. train_done.json is written last.


rule train:
    input:
        unpack(model_inputs),
        bank=rules.reference_bank.output.bank,
        prompts=train_prompts(),
    output:
        done=RUN + "/train_done.json",
    log:
        RUN + "/train.log",
    message:
        "Training {wildcards.method}, seed {wildcards.seed}"
    resources:
        gpu=1 if config["device"] == "cuda" else 0,
    script:
        "../scripts/train.py"
