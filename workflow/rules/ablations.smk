# Ablation studies (config `ablations`, drpo.ablations; the paper's: `snakemake --cores 2 ablations --configfile
# configs/ablations.yaml`). Every variant of every study trains DrPO on ablations.seeds and is judged at its last
# checkpoint only. A variant with the default recipe's training settings shares the default run's training (RUN),
# which is judged again here with the ablations' evaluation settings, once for every study. Each study gets a table and a figure; every study's table
# has the base generator's row.
from drpo.ablations import is_shared
from drpo.config import ABLATION_METHOD, shared_config, variant_config

ABL = R + "/ablations"
ABL_RUN = ABL + "/{study}/{variant}/runs/{method}/seed{seed}"
ABL_EVAL = ABL + "/{study}/{variant}/eval/{method}/seed{seed}/step{step}"
# The default recipe's runs and the base generator, judged with the ablations' evaluation.
ABL_DEFAULT_EVAL = ABL + "/default_recipe/eval/{method}/seed{seed}/step{step}"
STUDIES = config["ablations"]["studies"]


wildcard_constraints:
    study="[A-Za-z0-9_]+",
    variant="[A-Za-z0-9_]+",


def config_of(wildcards):
    return variant_config(config, wildcards.study, wildcards.variant)


def ablation_train_inputs(wildcards):
    cfg = config_of(wildcards)
    if cfg["train"]["reference"] != "online":
        raise WorkflowError(f"the ablation {wildcards.study}/{wildcards.variant} samples the base online: set "
                            "train.reference: online (a reference bank is built for the default recipe's K only)")
    return dict(models_of(cfg), prompts=train_prompts())


rule ablation_train:
    input:
        unpack(ablation_train_inputs),
    output:
        done=ABL_RUN + "/train_done.json",
    log:
        ABL_RUN + "/train.log",
    params:
        # The settings this run depends on, as for the train rule; the script rebuilds the variant's config.
        run=lambda w: run_settings(config_of(w), w.method, int(w.seed)),
        variant=lambda w: [w.study, w.variant],
    message:
        "Ablation {wildcards.study} = {wildcards.variant}: training {wildcards.method}, seed {wildcards.seed}"
    resources:
        gpu=lambda w: train_of(w.method, config_of(w))["processes"] if config["device"] == "cuda" else 0,
    script:
        "../scripts/train.py"


rule ablation_evaluate:
    input:
        unpack(lambda w: evaluation_inputs(config_of(w), ABL_RUN.format(**w) + "/train_done.json")),
    output:
        summary=ABL_EVAL + "/summary.json",
        images=ABL_EVAL + "/per_image.parquet",
    log:
        ABL_EVAL + "/evaluate.log",
    params:
        config=lambda w: {name: config_of(w)[name] for name in ("device", "models", "world", "evaluate")},
    message:
        "Ablation {wildcards.study} = {wildcards.variant}: evaluating seed {wildcards.seed} at step {wildcards.step}"
    resources:
        gpu=1 if config["device"] == "cuda" else 0,
    script:
        "../scripts/evaluate.py"


def default_recipe_done(wildcards):
    return None if wildcards.method == "base" else RUN.format(**wildcards) + "/train_done.json"


rule ablation_evaluate_default_recipe:
    input:
        unpack(lambda w: evaluation_inputs(shared_config(config), default_recipe_done(w))),
    output:
        summary=ABL_DEFAULT_EVAL + "/summary.json",
        images=ABL_DEFAULT_EVAL + "/per_image.parquet",
    log:
        ABL_DEFAULT_EVAL + "/evaluate.log",
    params:
        config={name: shared_config(config)[name] for name in ("device", "models", "world", "evaluate")},
    message:
        "Ablations: evaluating the default recipe's {wildcards.method}, seed {wildcards.seed}, step {wildcards.step}"
    resources:
        gpu=1 if config["device"] == "cuda" else 0,
    script:
        "../scripts/evaluate.py"


def study_summaries(study):
    """(label, summary file) of every run in a study's table: the base generator, then each variant's seeds."""
    base = ABL_DEFAULT_EVAL.format(method="base", seed=0, step=0) + "/summary.json"
    out = [("base", base)]
    for variant in STUDIES[study]["variants"]:
        steps = train_of(ABLATION_METHOD, variant_config(config, study, variant))["steps"]
        for seed in config["ablations"]["seeds"]:
            if is_shared(config, study, variant):
                path = ABL_DEFAULT_EVAL.format(method=ABLATION_METHOD, seed=seed, step=steps)
            else:
                path = ABL_EVAL.format(study=study, variant=variant, method=ABLATION_METHOD, seed=seed, step=steps)
            out.append((variant, path + "/summary.json"))
    return out


rule ablation_table:
    input:
        summaries=lambda w: [path for _, path in study_summaries(w.study)],
    output:
        table=f"{R}/tables/ablation_{{study}}.csv",
        markdown=f"{R}/tables/ablation_{{study}}.md",
        html=report(f"{R}/tables/ablation_{{study}}.html", category="Ablations", subcategory="{study}",
                    caption="../report/ablation.rst"),
        figure=report(f"{R}/figures/ablation_{{study}}.png", category="Ablations", subcategory="{study}",
                      caption="../report/ablation.rst"),
    log:
        f"{R}/logs/ablation_table_{{study}}.log",
    params:
        labels=lambda w: [label for label, _ in study_summaries(w.study)],
        study=lambda w: STUDIES[w.study],
        caption=caption_facts(config["ablations"]["seeds"]),
    message:
        "Writing the table and figure of the ablation {wildcards.study}"
    script:
        "../scripts/ablation_table.py"


def ablations_target(wildcards):
    if not STUDIES:
        raise WorkflowError("this config has no ablation studies (ablations.studies); the paper's are in "
                            "configs/ablations.yaml: snakemake --cores 2 ablations --configfile configs/ablations.yaml")
    return [*ablation_outputs(), f"{R}/tables/paper_vs_ours.html"]


rule ablations:
    # The ablations alone; `snakemake --cores 2 --configfile configs/ablations.yaml` makes them and the default run's
    # outputs, and its --report holds both.
    input:
        ablations_target,
