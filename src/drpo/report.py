"""Tables and figures regenerated from evaluation results (no model is needed here except the grid)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from drpo.evaluate import GENEVAL_TAGS  # noqa: E402

METRIC_LABELS = {
    "reward": "target reward ×100",
    "geneval_overall": "GenEval-lite overall (%)",
    "geneval_strict_overall": "GenEval-lite strict overall (%)",
    "diversity": "diversity (cosine distance)",
    **{f"geneval_{tag}": f"GenEval-lite {tag} (%)" for tag in GENEVAL_TAGS},
    **{f"geneval_strict_{tag}": f"strict {tag} (%)" for tag in GENEVAL_TAGS},
}


def metric_label(metric: str) -> str:
    """Axis/column label of a summary metric (held-out rewards are reward_<label>)."""
    if metric in METRIC_LABELS:
        return METRIC_LABELS[metric]
    return f"held-out reward: {metric.removeprefix('reward_')}"


def metric_columns(frame: pd.DataFrame) -> list[str]:
    """Metrics present in a table, in display order: target reward, held-out rewards, GenEval, diversity."""
    held_out = sorted(c for c in frame if c.startswith("reward_") and not c.endswith("_std"))
    ordered = ["reward", *held_out, *[m for m in METRIC_LABELS if m != "reward"]]
    return [m for m in ordered if m in frame]


def collect(summary_files: list[str | Path]) -> pd.DataFrame:
    """Stack evaluation summaries (JSON: method, seed, step and metrics) into one table."""
    # Breakdowns (a prompt set's per-category scores) are nested; the table takes the scalar metrics.
    rows = [{key: value for key, value in json.loads(Path(path).read_text()).items() if not isinstance(value, dict)}
            for path in summary_files]
    if not rows:
        raise ValueError("no evaluation summaries to report")
    return pd.DataFrame.from_records(rows).sort_values(["method", "seed", "step"]).reset_index(drop=True)


def with_base_rows(steps: pd.DataFrame) -> pd.DataFrame:
    """Add the base generator as step 0 of every (method, seed) curve."""
    base = steps[steps["method"] == "base"]
    curves = [steps[steps["method"] != "base"]]
    for (method, seed), _ in steps[steps["method"] != "base"].groupby(["method", "seed"]):
        curves.append(base.assign(method=method, seed=seed, step=0))
    return pd.concat(curves).sort_values(["method", "seed", "step"]).reset_index(drop=True)


def reward_gradient(method: str) -> str:
    """The main table's "reward grad." cell: does the method backpropagate through the reward?"""
    from drpo.methods import METHODS

    if method == "base":
        return "-"
    return "yes" if method in METHODS and METHODS[method].needs_reward_gradient else "no"


def preference_data(method: str) -> str:
    """The "data" cell: where the method's preferences come from, its own candidates ranked online by the reward or
    a preference dataset (the offline methods, Method.uses_preference_data)."""
    from drpo.methods import METHODS

    if method == "base":
        return "-"
    return "preference dataset" if method in METHODS and METHODS[method].uses_preference_data else "online ranking"


def final_table(steps: pd.DataFrame) -> pd.DataFrame:
    """Base row plus one row per method at its last step: mean and std over seeds, seed count, and whether
    the method needs reward gradients (the paper's main-table layout). A table with an offline method also says
    where each method's preferences come from (column "data"), online methods first."""
    metrics = metric_columns(steps)
    base = steps[steps["method"] == "base"]
    trained = steps[steps["method"] != "base"]
    last = trained[trained["step"] == trained.groupby("method")["step"].transform("max")]
    offline = any(preference_data(method) == "preference dataset" for method in last["method"].unique())
    rows = []
    # Paper layout: the base, then the methods without reward gradients, then those with them.
    methods = sorted(last.groupby("method"), key=lambda item: (
        reward_gradient(item[0]), preference_data(item[0]) == "preference dataset", item[0]))
    for method, group in [("base", base), *methods]:
        row = {"method": method, "steps": int(group["step"].max()), "uses_reward_grad": reward_gradient(method),
               **({"data": preference_data(method)} if offline else {}), "seeds": group["seed"].nunique()}
        for metric in metrics:
            row[metric] = group[metric].mean()
            row[f"{metric}_std"] = group[metric].std(ddof=0) if len(group) > 1 else 0.0
        rows.append(row)
    return pd.DataFrame.from_records(rows)


def write_tables(steps: pd.DataFrame, out_dir: str | Path) -> pd.DataFrame:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps.to_parquet(out_dir / "steps.parquet", index=False)
    steps.to_csv(out_dir / "steps.csv", index=False, float_format="%.4f")
    table = final_table(steps)
    table.to_parquet(out_dir / "summary.parquet", index=False)
    table.to_csv(out_dir / "summary.csv", index=False, float_format="%.4f")
    (out_dir / "summary.md").write_text(markdown_table(table))
    header, rows = summary_cells(table)
    (out_dir / "summary.html").write_text(html(header, rows, "Final results: base and each method's last checkpoint",
                                               "mean ± std over training seeds; rewards ×100, GenEval-lite in %"))
    return table


HTML_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title><style>
body {{ font-family: sans-serif; font-size: 13px; margin: 12px; }}
table {{ border-collapse: collapse; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: right; white-space: nowrap; }}
th {{ background: #f3f3f3; }} td:first-child, th:first-child {{ text-align: left; }}
</style></head><body><h3>{title}</h3><p>{note}</p>{table}</body></html>
"""


def html(header: list[str], rows: list[list[str]], title: str, note: str = "") -> str:
    """A table of string cells as a standalone HTML page: the HTML report shows HTML inline, but not CSV."""
    from html import escape

    table = pd.DataFrame(rows, columns=header).to_html(index=False, border=0)
    return HTML_PAGE.format(title=escape(title), note=escape(note), table=table)


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table of string cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def mean_std(row: pd.Series, metric: str) -> str:
    """A "mean ± std" cell (std over training seeds), diversity with four digits."""
    digits = 4 if metric == "diversity" else 2
    return f"{row[metric]:.{digits}f} ± {row[metric + '_std']:.{digits}f}"


def summary_cells(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """The summary's header and rows of string cells, metrics as mean ± std (and the "data" column of a table with
    offline methods)."""
    metrics = metric_columns(table)
    data = ["data"] if "data" in table else []
    header = ["method", "steps", "reward grad.", *data, "seeds", *[metric_label(m) for m in metrics]]
    return header, [[row["method"], str(row["steps"]), row["uses_reward_grad"], *[row[c] for c in data],
                     str(row["seeds"]), *[mean_std(row, m) for m in metrics]] for _, row in table.iterrows()]


def markdown_table(table: pd.DataFrame) -> str:
    """The summary as a Markdown table with mean ± std cells."""
    return markdown(*summary_cells(table))


def plot_curves(steps: pd.DataFrame, metrics: list[str], path: str | Path, columns: int | None = None) -> None:
    """Metric against update step, mean over seeds with a ±1 std band, one panel per metric, ``columns`` panels a
    row (all in one row by default)."""
    curves = with_base_rows(steps)
    metrics = [m for m in metrics if m in curves]
    columns = columns or len(metrics)
    rows = -(-len(metrics) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(metrics):]:
        ax.axis("off")
    for ax, metric in zip(axes.flat, metrics):
        for method, group in curves.groupby("method"):
            stats = group.groupby("step")[metric].agg(["mean", "std"]).fillna(0.0)
            n_seeds = group["seed"].nunique()
            data = ", preference dataset" if preference_data(method) == "preference dataset" else ""
            ax.plot(stats.index, stats["mean"], marker="o", ms=3, label=f"{method} ({n_seeds} seeds{data})")
            ax.fill_between(stats.index, stats["mean"] - stats["std"], stats["mean"] + stats["std"], alpha=0.2)
        ax.set_xlabel("update step")
        ax.set_ylabel(metric_label(metric))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def plot_task_bars(table: pd.DataFrame, path: str | Path) -> None:
    """GenEval-lite per task for the base and each method's last step (summary table from final_table): solid bars
    with GenEval's semantics, hatched ones strict (no more objects than asked), ±1 std over seeds."""
    tasks = [*GENEVAL_TAGS, "overall"]
    methods = list(table["method"])
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.6 * len(tasks)), 3.8))
    colors = plt.get_cmap("tab10").colors
    for i, (_, row) in enumerate(table.iterrows()):
        x = np.arange(len(tasks)) + (i - (len(methods) - 1) / 2) * width
        for hatch, prefix, label in ((None, "geneval", row["method"]), ("///", "geneval_strict", None)):
            values = [row.get(f"{prefix}_{task}", np.nan) for task in tasks]
            errors = [row.get(f"{prefix}_{task}_std", 0.0) for task in tasks]
            ax.bar(x, values, width * 0.9, yerr=errors, color=colors[i % 10], alpha=0.45 if hatch else 0.9,
                   hatch=hatch, edgecolor="white" if hatch else None, label=label, capsize=2,
                   error_kw={"elinewidth": 0.8})
    ax.set_xticks(np.arange(len(tasks)), [task.replace("_", " ") for task in tasks])
    ax.set_ylabel("GenEval-lite (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="grey", alpha=0.45, hatch="///", edgecolor="white"))
    labels.append("strict: no more objects than asked")
    ax.legend(handles, labels, fontsize=8, ncol=min(4, len(labels)))
    ax.set_title("GenEval-lite per task at the last update (solid: GenEval's semantics; hatched: strict)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def plot_grid(base: np.ndarray, tuned: np.ndarray, prompts: list[str], path: str | Path, *,
              tuned_label: str = "DrPO") -> None:
    """Base vs finetuned images for the same prompts and seeds.

    base, tuned: uint8 (n_prompts, n_seeds, H, W, 3). One row pair per prompt.
    """
    n_prompts, n_seeds = base.shape[:2]
    fig, axes = plt.subplots(n_prompts, 2 * n_seeds, figsize=(1.3 * 2 * n_seeds + 1, 1.45 * n_prompts),
                             squeeze=False)
    for i in range(n_prompts):
        for j in range(n_seeds):
            for k, (images, label) in enumerate(((base, "base"), (tuned, tuned_label))):
                ax = axes[i][k * n_seeds + j]
                ax.imshow(images[i, j], interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(f"{label} s{j}", fontsize=7)
        axes[i][0].set_ylabel(prompts[i].removeprefix("a photo of "), fontsize=6, rotation=0,
                              ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
