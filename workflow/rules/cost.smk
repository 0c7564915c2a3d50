# Compute-cost report (method spec section 6): per-component cost of one DrPO and one DRaFT update, as
# analytic FLOPs at paper scale (real architectures on the meta device, no weights), as measured time of
# the miniature on this machine, from GPU profiles of scripts/profile_gpu.py when given, and the paper's.


def cost_gpu_profiles():
    return [path for path in config["cost"]["gpu_profiles"] if Path(path).exists()]


rule cost_analytic:
    output:
        f"{R}/cost/analytic_flops.csv",
    params:
        section=config["cost"]["analytic"],
        drpo=config["drpo"],
    log:
        f"{R}/logs/cost_analytic.log",
    message:
        "Counting the FLOPs of DrPO and DRaFT updates at paper scale (meta device, no weights)"
    script:
        "../scripts/cost_report.py"


rule cost_measured:
    input:
        # The model files whether or not they exist yet, so that the measurement waits for a model being built
        # (it would otherwise time stand-ins) and reruns when one is rebuilt.
        unpack(model_inputs),
        prompts=train_prompts(),
    output:
        f"{R}/cost/measured_miniature.csv",
    params:
        # The measured methods are built from these sections as training builds them.
        config=sections("device", "models", "train", "drpo", "draft", "cost"),
    # It times this machine: run locally, holding every local core (--cores) so that no other job of the workflow
    # runs meanwhile (torch itself uses cost.measured.threads). Under a cluster executor there is no --cores (other
    # jobs run on the cluster's nodes, and Snakemake does not count cores for local jobs there): then 1, as
    # workflow.cores would stop such a run ("Workflow requires a total number of cores").
    localrule: True
    threads: workflow.resource_settings.cores or 1
    log:
        f"{R}/logs/cost_measured.log",
    message:
        "Timing DrPO and DRaFT updates of the miniature, component by component"
    script:
        "../scripts/cost_report.py"


rule cost_report:
    input:
        analytic=rules.cost_analytic.output[0],
        measured=rules.cost_measured.output[0],
        gpu=cost_gpu_profiles(),
    output:
        table=f"{R}/cost/cost_table.csv",
        table_html=report(f"{R}/cost/cost_table.html", category="Compute cost", caption="../report/cost.rst"),
        figure=report(f"{R}/cost/cost_components.png", category="Compute cost", caption="../report/cost.rst"),
    params:
        caption=caption_facts([]),
    log:
        f"{R}/logs/cost_report.log",
    message:
        "Writing the compute-cost table and the per-component figure"
    script:
        "../scripts/cost_report.py"
