"""Every table and figure again from the results on disk (the workflow's ``tables`` target), without training or
evaluating anything."""

from __future__ import annotations

from pathlib import Path

from drpo.ablations import write_study
from drpo.breakdowns import write_breakdowns
from drpo.cost.report import write_report
from drpo.judge import write_judge_table
from drpo.paper import write_comparison
from drpo.pipeline import make_report


def rebuild_tables(main: dict, studies: dict, cost: dict, breakdowns: dict, paper_vs_ours: str, setting: str,
                   judge: dict | None = None, log=print) -> None:
    """Every table and figure again from the results on disk (the ``tables`` rule): the main table and curves from
    the evaluation summaries that exist (``main``: their paths and make_report's outputs), each ablation study's
    from its summaries (``studies``: spec, (label, path) pairs and outputs), the breakdown tables (``breakdowns``:
    rule breakdowns' parts and outputs), the cost report from its measurements, the paper-vs-ours table, and the
    pairwise judge's table (``judge``: its pairs' summaries and outputs; none without a judge). A part with none of
    its inputs on disk is skipped and said so."""

    def existing(paths):
        found = [path for path in paths if Path(path).exists()]
        if len(found) < len(paths):
            log(f"  {len(paths) - len(found)} of {len(paths)} missing, e.g. {next(p for p in paths if p not in found)}")
        return found

    log("main table and curves:")
    if summaries := existing(main["summaries"]):
        make_report(summaries, Path(main["table"]).parent, main["reward"], main.get("geneval"), main.get("tasks"))
    for study, parts in studies.items():
        log(f"ablation {study}:")
        found = set(existing([path for _, path in parts["summaries"]]))
        pairs = [(label, path) for label, path in parts["summaries"] if path in found]
        if any(label != "base" for label, _ in pairs):
            write_study(pairs, parts["spec"], parts["table"], parts["markdown"], parts["html"], parts["figure"])
    for name, part in breakdowns["parts"].items():
        log(f"breakdown {name}:")
        if part["kind"] == "prompt_sets":
            found = {prompt_set: existing(paths) for prompt_set, paths in part["summaries"].items()}
            if found := {prompt_set: paths for prompt_set, paths in found.items() if paths}:
                write_breakdowns({name: part | {"summaries": found}}, breakdowns["outputs"])
        elif found := existing(part["summaries"]):
            write_breakdowns({name: part | {"summaries": found}}, breakdowns["outputs"])
    log("compute cost:")
    measured = existing(cost["measured"])
    if existing([cost["analytic"]]) and measured:
        write_report(cost["analytic"], measured, cost["table"], cost["figure"])
    log("paper vs ours:")
    write_comparison(Path(paper_vs_ours).parent, setting, paper_vs_ours)
    if judge and judge["summaries"]:
        log("pairwise judge:")
        if summaries := existing(judge["summaries"]):
            write_judge_table(summaries, judge["table"], judge["markdown"], judge["html"])
