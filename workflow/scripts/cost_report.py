"""The three rules of workflow/rules/cost.smk: analytic FLOPs, measured miniature, the table and figure."""

from _job import start

start(snakemake)
from drpo.cost.report import measure_miniature, run_analytic, write_report
from drpo.prompt_files import read_rows

if snakemake.rule == "cost_analytic":
    run_analytic(snakemake.params.section, snakemake.params.drpo, snakemake.output[0])
elif snakemake.rule == "cost_measured":
    measure_miniature(snakemake.params.config, read_rows(snakemake.input.prompts), snakemake.output[0])
else:
    write_report(snakemake.input.analytic, [snakemake.input.measured, *snakemake.input.gpu],
                 snakemake.output.table, snakemake.output.figure)
