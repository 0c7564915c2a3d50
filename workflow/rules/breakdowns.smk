# The final results broken down: every evaluation prompt set, each Parti-Prompts category, each GenEval task.


def prompt_set_inputs(wildcards):
    """evaluate's inputs, with the set's prompt file (common.smk: prompt_file_input) for the test prompts."""
    inputs = {key: path for key, path in evaluate_inputs(wildcards).items() if key != "prompts"}
    return inputs | prompt_file_input(prompt_sets()[wildcards.prompt_set])


rule evaluate_prompt_set:
    # The base and each run's last checkpoint on one of the further prompt sets (common.smk: prompt_sets()).
    input:
        unpack(prompt_set_inputs),
    output:
        summary=EVAL_SET + "/summary.json",
        images=EVAL_SET + "/per_image.parquet",
    log:
        EVAL_SET + "/evaluate.log",
    params:
        config=sections("device", "models", "world", "evaluate"),
        prompts=lambda w: prompt_sets()[w.prompt_set],
    message:
        "Evaluating {wildcards.method} seed {wildcards.seed} at step {wildcards.step} on {wildcards.prompt_set}"
    resources:
        gpu=1 if config["device"] == "cuda" else 0,
    script:
        "../scripts/evaluate.py"


def breakdown_parts():
    """What each breakdown table is made of: its kind, prompt set and summary files (rule breakdowns' params)."""
    parts = {}
    for name in breakdown_outputs():
        kind, _, prompt_set = name.partition("_")
        if name == "prompt_sets":
            parts[name] = {"kind": "prompt_sets", "summaries": {s: last_step_summaries(EVAL_SET, prompt_set=s)
                                                                 for s in prompt_sets()}}
        elif prompt_set == "test":
            parts[name] = {"kind": kind, "prompt_set": "test", "summaries": last_step_summaries(EVAL)}
        else:
            parts[name] = {"kind": kind, "prompt_set": prompt_set,
                           "summaries": last_step_summaries(EVAL_SET, prompt_set=prompt_set)}
    return parts


rule breakdowns:
    input:
        summaries=sorted({path for part in breakdown_parts().values() for path in
                          (sum(part["summaries"].values(), []) if part["kind"] == "prompt_sets" else part["summaries"])}),
    output:
        **{f"{name}_{ext}": (report(path, category="Breakdowns", caption="../report/breakdowns.rst")
                             if ext == "html" else path)
           for name, files in breakdown_outputs().items() for ext, path in files.items()},
    log:
        f"{R}/logs/breakdowns.log",
    params:
        parts=breakdown_parts(),
        outputs=breakdown_outputs(),
        caption=caption_facts(config["train"]["seeds"]),
    message:
        "Breaking the results down by prompt set, category and GenEval task"
    script:
        "../scripts/breakdowns.py"
