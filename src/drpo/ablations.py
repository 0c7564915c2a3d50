"""The paper's ablations on the miniature: studies that each vary one thing of the default recipe.

A study (config ``ablations.studies.<study>``; the paper's are in configs/ablations.yaml) names variants, each a
config fragment merged over the workflow config as a preset is (:func:`variant_config`); a variant whose training
settings are the default recipe's shares the default run. Every variant trains ``ablations.seeds`` and is judged at its last checkpoint with the default
evaluation with ``ablations.evaluate`` merged over it. :func:`study_table` puts a study's summaries in one table (mean
and std over seeds per variant); :func:`plot_study` draws it: a line plot over a numeric axis (K, eta), grouped
bars otherwise, and for the reward study a train-on x judge-on matrix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from drpo.config import ABLATION_METHOD, shared_config, variant_config

# The columns of every study's table and figure, with their labels: the rewards every run is judged with
# (x100), GenEval-lite with GenEval's semantics and strict, and diversity.
STUDY_METRICS = {
    "reward_detector": "detector pass rate ×100",
    "reward_pickscore": "CLIP reward ×100",
    "reward_heldout": "held-out CLIP ×100",
    "geneval_overall": "GenEval-lite (%)",
    "geneval_strict_overall": "GenEval-lite strict (%)",
    "diversity": "diversity",
}


def is_shared(config: dict[str, Any], study: str, variant: str) -> bool:
    """A variant whose training settings are the default recipe's shares the default run's training."""
    from drpo.pipeline import run_settings

    return (run_settings(variant_config(config, study, variant), ABLATION_METHOD, 0)
            == run_settings(shared_config(config), ABLATION_METHOD, 0))


def study_table(summaries: list[tuple[str, str | Path]]) -> pd.DataFrame:
    """One row per label (in the order given; the base generator's label is "base"), from (label, evaluation
    summary) pairs, one pair per training seed: mean and std over seeds of every STUDY_METRICS column present, the
    last step and the seed count."""
    runs = pd.DataFrame.from_records([json.loads(Path(path).read_text()) | {"variant": label}
                                      for label, path in summaries])
    if runs.empty:
        raise ValueError("no ablation summaries to tabulate")
    rows = []
    for variant, group in runs.groupby("variant", sort=False):
        row = {"variant": variant, "steps": int(group["step"].max()), "seeds": group["seed"].nunique()}
        for metric in (m for m in STUDY_METRICS if m in group):
            row[metric] = group[metric].mean()
            row[f"{metric}_std"] = group[metric].std(ddof=0)
        rows.append(row)
    return pd.DataFrame.from_records(rows)


def cells(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """The study table's header and rows of string cells, metrics as mean ± std over training seeds (the base
    generator's std is 0)."""
    from drpo.report import mean_std

    metrics = [m for m in STUDY_METRICS if m in table]
    header = ["variant", "steps", "seeds", *[STUDY_METRICS[m] for m in metrics]]
    return header, [[str(row["variant"]), str(row["steps"]), str(row["seeds"]), *[mean_std(row, m) for m in metrics]]
                    for _, row in table.iterrows()]


def write_study(summaries: list[tuple[str, str | Path]], study: dict[str, Any], table_csv: str | Path,
                markdown_md: str | Path, html_page: str | Path, figure_png: str | Path) -> pd.DataFrame:
    """A study's table (CSV, Markdown, HTML) and figure, from (label, summary) pairs as :func:`study_table` takes."""
    from drpo.report import html, markdown

    table = study_table(summaries)
    table.to_csv(table_csv, index=False)
    header, rows = cells(table)
    Path(markdown_md).write_text(f"**{study['title']}**\n\n" + markdown(header, rows))
    Path(html_page).write_text(html(header, rows, study["title"], "last checkpoint, mean ± std over training seeds"))
    if study["plot"] == "matrix":
        plot_reward_matrix(table, study["title"], figure_png)
    else:
        plot_study(table, study["title"], study["axis"] if study["plot"] == "line" else None, figure_png)
    return table


def plot_study(table: pd.DataFrame, title: str, axis: str | None, path: str | Path) -> None:
    """Every metric against a numeric ``axis`` (a line), or one point per variant; ±1 std over seeds as error bars;
    the base generator as a dashed line. Points, not bars: the axes do not start at zero."""
    plt = _pyplot()
    metrics = [m for m in STUDY_METRICS if m in table]
    base = table[table["variant"] == "base"]
    trained = table[table["variant"] != "base"]
    labels = [str(v) for v in trained["variant"]]
    columns = (len(metrics) + 1) // 2
    fig, axes = plt.subplots(2, columns, figsize=(3.4 * columns, 6.2), squeeze=False)
    x = np.array([float(v) for v in labels]) if axis else np.arange(len(labels))
    for ax, metric in zip(axes.flat, metrics):
        values, errors = trained[metric].to_numpy(), trained[f"{metric}_std"].to_numpy()
        ax.errorbar(x, values, yerr=errors, marker="o", capsize=4, color="tab:blue", label="DrPO",
                    linestyle="-" if axis else "none")
        if axis:
            ax.set_xlabel(axis)
            ax.set_xticks(x, labels)
        else:
            ax.set_xticks(x, labels, rotation=25, ha="right", fontsize=8)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        lows, highs = [values - errors], [values + errors]
        if not base.empty:
            ax.axhline(base[metric].iat[0], color="gray", linestyle="--", label="base")
            lows.append(base[metric].to_numpy())
            highs.append(base[metric].to_numpy())
        low, high = np.nanmin(np.concatenate(lows)), np.nanmax(np.concatenate(highs))
        pad = 0.15 * (high - low) if high > low else max(1.0, 0.02 * abs(high))
        ax.set_ylim(low - pad, high + pad)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_title(STUDY_METRICS[metric], fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    seeds = int(trained["seeds"].max()) if not trained.empty else 0
    fig.suptitle(f"{title}: last checkpoint, mean ± std over {seeds} training seed{'s' * (seeds != 1)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def plot_reward_matrix(table: pd.DataFrame, title: str, path: str | Path) -> None:
    """Train on a row's reward, judge on every column: the change against the base generator in the column's own
    units (cell text), coloured by its share of the column's largest change."""
    plt = _pyplot()
    columns = [m for m in STUDY_METRICS if m in table and m != "diversity"]
    base = table.set_index("variant").loc["base", columns]
    trained = table[table["variant"] != "base"].set_index("variant")[columns]
    delta = trained - base
    scaled = delta / delta.abs().max().replace(0, 1)
    fig, ax = plt.subplots(figsize=(1.6 * len(columns) + 2.2, 0.6 * len(trained) + 2.0))
    ax.imshow(scaled.to_numpy(dtype=float), cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
    for i in range(len(trained)):
        for j in range(len(columns)):
            ax.text(j, i, f"{delta.iat[i, j]:+.2f}", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(columns)), [f"judged by\n{STUDY_METRICS[c]}" for c in columns], fontsize=8)
    ax.set_yticks(range(len(trained)), [f"trained on {v}" for v in trained.index], fontsize=8)
    ax.set_title(f"{title}\nchange against the base generator (mean over seeds; blue: up, red: down)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
