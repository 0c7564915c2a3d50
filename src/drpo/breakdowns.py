"""Tables that break the final results down: by evaluation prompt set, by Parti-Prompts category, by GenEval task.

Each reads evaluation summaries (JSON, as drpo.evaluate.summarize writes them) of the base and of every run's last
checkpoint, and writes CSV (numbers: mean and std over training seeds), Markdown and HTML (mean ± std cells).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from drpo.evaluate import GENEVAL_TAGS
from drpo.report import collect, final_table, html, markdown, mean_std, metric_columns, metric_label


def _write(frame: pd.DataFrame, header: list[str], rows: list[list[str]], out: dict, title: str, note: str) -> None:
    """``frame`` to out["table"] (CSV); the string cells to out["markdown"] and out["html"]."""
    Path(out["table"]).parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out["table"], index=False, float_format="%.4f")
    Path(out["markdown"]).write_text(markdown(header, rows))
    Path(out["html"]).write_text(html(header, rows, title, note))


def write_prompt_set_table(summaries: dict[str, list[str]], out: dict) -> pd.DataFrame:
    """One row per (prompt set, method): the base and each method's last step, mean ± std over seeds, for the
    metrics every set has. ``summaries``: set name -> its summary files."""
    tables = [final_table(collect(paths)).assign(prompt_set=name) for name, paths in summaries.items()]
    metrics = [m for m in metric_columns(tables[0]) if all(m in table for table in tables)]
    frame = pd.concat(tables, ignore_index=True)
    columns = ["prompt_set", "method", "steps", "seeds"]
    frame = frame[columns + [c for m in metrics for c in (m, f"{m}_std")]]
    header = ["prompt set", "method", "steps", "seeds", *[metric_label(m) for m in metrics]]
    rows = [[row["prompt_set"], row["method"], str(row["steps"]), str(row["seeds"]),
             *[mean_std(row, m) for m in metrics]] for _, row in frame.iterrows()]
    _write(frame, header, rows, out, "Evaluation prompt sets: base and each method's last checkpoint",
           "mean ± std over training seeds; rewards ×100 (or their report scale)")
    return frame


def write_category_table(summary_files: list[str], prompt_set: str, out: dict) -> pd.DataFrame:
    """The target reward per prompt category (Parti-Prompts): one row per category with its prompt count, one
    column per model (the base, each method at its last step), mean ± std over seeds."""
    records = []
    for path in summary_files:
        summary = json.loads(Path(path).read_text())
        if "categories" not in summary:
            raise ValueError(f"{path} has no per-category scores: its prompts carry no category (a Parti-Prompts "
                             "TSV's Category column)")
        for category, scores in summary["categories"].items():
            records.append({"method": summary["method"], "seed": summary["seed"], "step": summary["step"],
                            "category": category, "prompts": scores["prompts"], "reward": scores["reward"]})
    scores = pd.DataFrame.from_records(records)
    trained = scores[scores["method"] != "base"]
    last = trained[trained["step"] == trained.groupby("method")["step"].transform("max")]
    models = ["base", *sorted(last["method"].unique())]
    final = pd.concat([scores[scores["method"] == "base"], last])
    stats = final.groupby(["category", "method"])["reward"].agg(mean="mean", std=lambda x: x.std(ddof=0))
    prompts = scores.groupby("category")["prompts"].first()
    frame = pd.DataFrame({"category": prompts.index, "prompts": prompts.values})
    for model in models:
        frame[model] = [stats.loc[(c, model), "mean"] for c in frame["category"]]
        frame[f"{model}_std"] = [stats.loc[(c, model), "std"] for c in frame["category"]]
    header = ["category", "prompts", *models]
    rows = [[row["category"], str(row["prompts"]),
             *[f"{row[m]:.2f} ± {row[m + '_std']:.2f}" for m in models]] for _, row in frame.iterrows()]
    _write(frame, header, rows, out, f"Target reward ×100 per category: {prompt_set}",
           "each model's last checkpoint; mean over the category's prompts, ± std over training seeds")
    return frame


def write_geneval_table(summary_files: list[str], prompt_set: str, out: dict) -> pd.DataFrame:
    """GenEval per task, the paper's layout: one row per model (the base, each method at its last step), the six
    tasks and the overall score (the mean of the tasks) in %, mean ± std over seeds."""
    table = final_table(collect(summary_files))
    columns = [f"geneval_{tag}" for tag in (*GENEVAL_TAGS, "overall")]
    if "geneval_overall" not in table:
        raise ValueError(f"the summaries of {prompt_set} have no GenEval verdicts: they need GenEval metadata "
                         "prompts (.jsonl) and a GenEval judge (the miniature's detector or the geneval reward)")
    frame = table[["method", "steps", "seeds"] + [c for m in columns for c in (m, f"{m}_std")]]
    header = ["method", "steps", "seeds", *[tag.replace("_", " ") for tag in GENEVAL_TAGS], "overall"]
    rows = [[row["method"], str(row["steps"]), str(row["seeds"]), *[mean_std(row, m) for m in columns]]
            for _, row in frame.iterrows()]
    _write(frame, header, rows, out, f"GenEval per task (%): {prompt_set}",
           "GenEval's semantics; overall = mean of the six tasks; mean ± std over training seeds")
    return frame


def write_breakdowns(parts: dict, outputs: dict) -> None:
    """Every breakdown table: ``parts`` maps a table's name to its kind ("prompt_sets", "categories", "geneval"),
    prompt set and summary files; ``outputs`` to its {table, markdown, html} paths."""
    for name, part in parts.items():
        if part["kind"] == "prompt_sets":
            write_prompt_set_table(part["summaries"], outputs[name])
        elif part["kind"] == "categories":
            write_category_table(part["summaries"], part["prompt_set"], outputs[name])
        else:
            write_geneval_table(part["summaries"], part["prompt_set"], outputs[name])
