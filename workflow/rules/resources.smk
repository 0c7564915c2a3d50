# Cluster resources that depend on the config (profiles/slurm, docs/slurm.md). Included last, once every rule
# exists. Local runs have no set-resources, so this changes nothing for them.
#
# The GPU rules, those that declare a `gpu` resource (train, reference_bank, evaluate, grid and their ablation
# counterparts), ask for GPUs only with device: cuda. With any other device they are CPU jobs, and their entries in
# set-resources, which describe GPU jobs (the GPU partition, CPUs per GPU, the host memory of a paper-scale run),
# would send them to a GPU partition with a GPU job's size. So for them those entries are dropped here: they take
# default-resources, like every CPU rule. Keys that default-resources does not set are removed (cpus_per_gpu,
# nodes, ...). Every other rule's set-resources apply as given.
from snakemake.logging import logger
from snakemake.resources import Resources


def gpu_rules_as_cpu_jobs():
    settings = workflow.resource_settings
    defaults = Resources.from_mapping(settings.default_resources or {})
    dropped = []
    for gpu_rule in workflow.rules:
        overrides = settings.overwrite_resources.get(gpu_rule.name)
        if "gpu" not in gpu_rule.resources or not overrides:
            continue
        overrides = Resources.from_mapping(overrides)  # the same key names as the rule's (mem_mb is stored as mem)
        kept = Resources.from_mapping({})
        for key, value in gpu_rule.resources.items():
            if key not in overrides:
                kept[key] = value
            elif key in defaults:
                kept[key] = defaults[key]
        gpu_rule.resources = kept
        dropped.append(gpu_rule.name)
    if dropped:
        logger.info(f"device is {config['device']!r}, not 'cuda': rules {', '.join(dropped)} run as CPU jobs with "
                    "default-resources; their set-resources entries (GPU jobs) are not used")


if config["device"] != "cuda":
    gpu_rules_as_cpu_jobs()
