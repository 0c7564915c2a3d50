# Online training, one job per (method, seed). Checkpoints are written inside the run folder but
# are not declared outputs: Snakemake deletes the outputs of a failed job, and a rerun must find
# them to resume. train_done.json is written last. With the method's train.processes > 1 the job runs
# `accelerate launch` over that many GPUs (one Slurm task holding all of them, see profiles/slurm). An offline method
# (drpo.methods.offline*) trains from the preference dataset's latent cache (rules/preferences.smk).


def train_inputs(wildcards):
    inputs = dict(model_inputs(), prompts=train_prompts())
    if uses_preference_data(wildcards.method):  # an offline method: the dataset's latents, base sampled online
        inputs["preferences"] = PREFERENCE_CACHE + "/done.json"
    elif config["train"]["reference"] == "bank":
        inputs["bank"] = rules.reference_bank.output.bank
    return inputs


rule train:
    input:
        unpack(train_inputs),
    output:
        done=RUN + "/train_done.json",
    log:
        RUN + "/train.log",
    params:
        # The settings this run depends on (drpo.pipeline.run_settings): a change reruns this run only, and adding
        # a seed or a method reruns no other. The script takes the whole config, which the run saves as
        # config.resolved.yaml; the run folder refuses to resume from checkpoints of other settings.
        run=run_settings_of,
    message:
        ("Training {wildcards.method}, seed {wildcards.seed}: {params.run[train][steps]} updates of "
         "{params.run[train][prompts_per_step]} prompts x K={params.run[train][candidates]}, "
         "{params.run[train][mixed_precision]}, lr {params.run[train][learning_rate]}, GPUs: {resources.gpu}")
    resources:
        # The method's own process count (train.per_method).
        gpu=lambda w: train_of(w.method)["processes"] if config["device"] == "cuda" else 0,
    script:
        "../scripts/train.py"
