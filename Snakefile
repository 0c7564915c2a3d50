# DrPO reproduction workflow. The rules are thin: every step calls the drpo package.
# Default: the miniature world (config.yaml). Paper scale: --configfile configs/sd-turbo.yaml.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/world.smk"
include: "workflow/rules/miniature.smk"
include: "workflow/rules/reference.smk"
include: "workflow/rules/preferences.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/breakdowns.smk"
include: "workflow/rules/judge.smk"
include: "workflow/rules/cost.smk"
include: "workflow/rules/ablations.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/resources.smk"  # last: it adjusts the rules above for clusters


rule all:
    default_target: True
    input:
        final_outputs(),
