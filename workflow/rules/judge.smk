# Pairwise preference by a vision-language judge (method spec 5.4, drpo.judge): for every pair of judge.pairs and
# every prompt set, the two models' images for the same (prompt, seed) noises are shown to the judge, and
# tables/judge.* count the first model's wins, losses, ties and invalid answers. Off when judge.model is null.
from drpo.judge import BASE, judged_seed, judged_step
from drpo.run_folder import CHECKPOINT_PREFIX

JUDGE = R + "/judge/{prompt_set}/{a}_vs_{b}"


wildcard_constraints:
    a="[a-z0-9_]+",
    b="[a-z0-9_]+",


def judge_prompt_sets():
    """Prompt set name -> the prompt file its pairs are judged on: judge.prompt_sets, or every evaluation prompt set
    (common.smk: prompt_sets()), or the test prompts where there is none."""
    sets = {"test": test_prompts(), **prompt_sets()}
    names = config["judge"]["prompt_sets"] or [name for name in sets if name != "test"] or ["test"]
    return {name: sets[name] for name in names}


def judge_summaries():
    """Every pair's summary.json, for every prompt set (none when the stage is off)."""
    if config["judge"]["model"] is None:
        return []
    return [JUDGE.format(prompt_set=name, a=a, b=b) + "/summary.json"
            for name in judge_prompt_sets() for a, b in config["judge"]["pairs"]]


def judge_run_dir(method):
    """The run folder of a judged method (None for the base generator)."""
    return None if method == BASE else RUN.format(method=method, seed=judged_seed(config))


def judge_inputs(wildcards):
    """The generator, the judge's model (the miniature's, built by rule miniature_judge, or the asset check at
    paper scale), the prompt set, and the training runs of the two methods."""
    if config["world"]["enabled"]:
        inputs = {"generator": config["models"]["generator"]["path"] + "/model_index.json",
                  "judge": config["judge"]["model"] + "/config.json"}
    else:
        inputs = model_inputs()  # the asset check, which lists the judge's files too
    inputs |= prompt_file_input(judge_prompt_sets()[wildcards.prompt_set])
    for side in ("a", "b"):
        if run_dir := judge_run_dir(wildcards[side]):
            inputs[f"done_{side}"] = run_dir + "/train_done.json"
    return inputs


def judge_checkpoints(wildcards):
    """The LoRA checkpoint folders of A and B (None: the base), the judge rule's params."""
    methods = [wildcards[side] for side in ("a", "b")]
    return [None if method == BASE else
            f"{judge_run_dir(method)}/checkpoints/{CHECKPOINT_PREFIX}{judged_step(config, method)}"
            for method in methods]


def judge_run(wildcards):
    """The training seed and each model's checkpoint step (0: the base), which the pair's summary records."""
    return {"train_seed": judged_seed(config), **{f"step_{side}": judged_step(config, wildcards[side]) for side in "ab"}}


rule judge:
    input:
        unpack(judge_inputs),
    output:
        verdicts=JUDGE + "/verdicts.parquet",
        verdicts_csv=JUDGE + "/verdicts.csv",
        summary=JUDGE + "/summary.json",
    log:
        JUDGE + "/judge.log",
    params:
        # What a pair's verdicts depend on: the list of pairs is left out, so that adding a pair reruns no other.
        config={"device": config["device"], "models": {"generator": config["models"]["generator"]},
                "evaluate": {"batch_size": config["evaluate"]["batch_size"]},
                "judge": {key: value for key, value in config["judge"].items() if key != "pairs"}},
        checkpoints=judge_checkpoints,
        run=judge_run,
        prompts=lambda w: judge_prompt_sets()[w.prompt_set],
    message:
        "Judging {wildcards.a} vs {wildcards.b} on the {wildcards.prompt_set} prompts with a vision-language model"
    resources:
        gpu=1 if config["device"] == "cuda" else 0,
    script:
        "../scripts/judge.py"


rule judge_table:
    input:
        summaries=judge_summaries(),
    output:
        table=f"{R}/tables/judge.csv",
        markdown=f"{R}/tables/judge.md",
        html=report(f"{R}/tables/judge.html", category="Pairwise judge", caption="../report/judge.rst"),
    log:
        f"{R}/logs/judge_table.log",
    params:
        caption=caption_facts([judged_seed(config)]) | {
            "judge": str(config["judge"]["model"]), "eval_seeds": ", ".join(map(str, config["judge"]["seeds"]))},
    message:
        "Writing the pairwise judge's table"
    script:
        "../scripts/judge_table.py"
