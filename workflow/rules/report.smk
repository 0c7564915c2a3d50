# Tables and figures, regenerated from evaluation summaries alone (no retraining). In the HTML report
# (`snakemake --report report.html`), a run of DrPO alone is "Main results", one with baselines "Baselines", one
# with methods trained from a preference dataset "Offline".
if any(uses_preference_data(method) for method in config["train"]["methods"]):
    MAIN_CATEGORY = "Offline"
elif set(config["train"]["methods"]) - {"drpo"}:
    MAIN_CATEGORY = "Baselines"
else:
    MAIN_CATEGORY = "Main results"


def report_outputs():
    outputs = {
        # The report shows the table's HTML page; CSV is for tools.
        "table": f"{R}/tables/summary.csv",
        "table_html": report(f"{R}/tables/summary.html", category=MAIN_CATEGORY, caption="../report/summary.rst"),
        "steps": f"{R}/tables/steps.csv",
        "reward": report(f"{R}/figures/reward_vs_step.png", category=MAIN_CATEGORY, caption="../report/curves.rst"),
    }
    if config["world"]["enabled"]:  # GenEval-lite tasks exist only in the miniature world
        outputs["geneval"] = report(f"{R}/figures/geneval_vs_step.png", category=MAIN_CATEGORY,
                                    caption="../report/curves.rst")
        outputs["tasks"] = report(f"{R}/figures/geneval_tasks.png", category=MAIN_CATEGORY,
                                  caption="../report/tasks.rst")
    return outputs


rule report:
    input:
        summaries=eval_summaries(),
    output:
        **report_outputs(),
    log:
        f"{R}/logs/report.log",
    params:
        caption=caption_facts(config["train"]["seeds"]),
    message:
        "Writing the results tables and curves"
    script:
        "../scripts/report.py"


rule grid:
    input:
        unpack(model_inputs),
        prompts=test_prompts(),
        done=RUN.replace("{seed}", "{grid_seed}") + "/train_done.json",
    output:
        report(f"{R}/figures/grid_base_vs_{{method}}_seed{{grid_seed}}.png", category=MAIN_CATEGORY,
               caption="../report/grid.rst"),
    log:
        f"{R}/logs/grid_{{method}}_seed{{grid_seed}}.log",
    params:
        config=sections("device", "models", "report", "evaluate"),
        caption=caption_facts(config["train"]["seeds"]),
    message:
        "Drawing base vs {wildcards.method} images for the same prompts and seeds"
    resources:
        gpu=1 if config["device"] == "cuda" else 0,
    script:
        "../scripts/grid.py"


rule provenance:
    output:
        config=f"{R}/provenance/config.resolved.yaml",
        environment=f"{R}/provenance/environment.json",
    log:
        f"{R}/logs/provenance.log",
    message:
        "Saving the resolved config and package versions"
    script:
        "../scripts/provenance.py"


rule check_assets:
    output:
        f"{R}/provenance/assets.json",
    log:
        f"{R}/logs/check_assets.log",
    params:
        config=sections("models", "evaluate", "world", "prompts") | offline_asset_settings() | judge_asset_settings(),
    message:
        "Checking that every model file of this config is on disk"
    script:
        "../scripts/check_assets.py"
