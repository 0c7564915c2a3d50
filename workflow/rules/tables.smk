# Tables across targets: the paper's numbers next to ours (from the main table and the ablation tables on disk),
# and `snakemake --cores 2 tables`, which rebuilds every table and figure from what is on disk.


rule paper_vs_ours:
    input:
        main=rules.report.output.table,
        studies=[path for path in ablation_outputs() if path.endswith(".csv")],
    output:
        markdown=f"{R}/tables/paper_vs_ours.md",
        table=f"{R}/tables/paper_vs_ours.csv",
        html=report(f"{R}/tables/paper_vs_ours.html", category="Paper vs ours", caption="../report/paper_vs_ours.rst"),
    log:
        f"{R}/logs/paper_vs_ours.log",
    params:
        setting=SETTING,
        caption=caption_facts(config["train"]["seeds"]),
    message:
        "Putting the paper's published numbers next to ours"
    script:
        "../scripts/paper_vs_ours.py"


rule tables:
    # No output: it runs whenever asked for, and rebuilds every table and figure from the evaluation summaries
    # and cost measurements on disk, without training or evaluating anything (nor drawing the image grids, which
    # need the models). Each part whose summaries are all missing is skipped, with a line in the log.
    params:
        main={"summaries": eval_summaries(), **{name: str(path) for name, path in report_outputs().items()}},
        studies={study: {"spec": spec, "summaries": study_summaries(study), "table": f"{R}/tables/ablation_{study}.csv",
                         "markdown": f"{R}/tables/ablation_{study}.md", "html": f"{R}/tables/ablation_{study}.html",
                         "figure": f"{R}/figures/ablation_{study}.png"}
                 for study, spec in STUDIES.items()},
        cost={"analytic": f"{R}/cost/analytic_flops.csv",
              "measured": [f"{R}/cost/measured_miniature.csv", *cost_gpu_profiles()],
              "table": f"{R}/cost/cost_table.csv", "figure": f"{R}/cost/cost_components.png"},
        breakdowns={"parts": breakdown_parts(), "outputs": breakdown_outputs()},
        paper_vs_ours=f"{R}/tables/paper_vs_ours.md",
        setting=SETTING,
        judge={"summaries": judge_summaries(), **{name: str(path) for name, path in rules.judge_table.output.items()}},
    localrule: True
    log:
        f"{R}/logs/tables.log",
    message:
        "Rebuilding every table and figure from the results on disk (no training, no evaluation)"
    script:
        "../scripts/tables.py"
