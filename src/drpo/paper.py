"""The paper's published numbers (method spec section 10) next to ours: the paper-vs-ours table.

Each :class:`Finding` is one ordering the paper reports, "``higher`` scores above ``lower``" on one metric, with the
paper's two numbers, and where our tables hold the same comparison: a row label of our main table (summary.csv,
rows by method) or of an ablation study's table (ablation_<study>.csv, rows by variant) and the metric column.
:func:`compare` reads whichever of those tables exist and says for each finding whether ours agrees with the
paper's ordering, disagrees, lies within the seeds' spread, or was not run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from drpo.report import html, markdown

# Our columns and what they measure (the miniature's analogues of the paper's metrics).
OUR_METRICS = {
    "reward": "target reward ×100",
    "reward_heldout": "held-out CLIP scorer ×100",
    "reward_detector": "detector pass rate ×100 (the default target)",
    "geneval_overall": "GenEval-lite overall (%)",
    **{f"geneval_{tag}": f"GenEval-lite {tag} (%)"
       for tag in ("single_object", "two_object", "counting", "colors", "position", "color_attr")},
}


@dataclass(frozen=True)
class Finding:
    topic: str
    paper_metric: str
    higher: str  # the paper's labels: `higher` scored above `lower`
    lower: str
    paper_higher: float
    paper_lower: float
    table: str  # "summary" or "ablation_<study>"
    ours_higher: str  # row labels in our table
    ours_lower: str
    metric: str  # our column


PS = "SD-Turbo, PickScore ×100 (Pick-a-Pic v2)"
GENEVAL_TASKS = {"single_object": (98.8, 100.0), "two_object": (46.5, 55.6), "counting": (33.8, 42.5),
                 "colors": (83.8, 87.2), "position": (8.0, 13.0), "color_attr": (9.0, 13.0)}

FINDINGS: list[Finding] = [
    # The main SD-Turbo table: DrPO against the base and each baseline on the target reward.
    Finding("main", PS, "DrPO", "base", 23.49, 21.88, "summary", "drpo", "base", "reward"),
    Finding("main", "SD-Turbo, ImageReward ×10 (Pick-a-Pic v2)", "DrPO", "base", 9.54, 5.75, "summary", "drpo",
            "base", "reward_heldout"),
    Finding("main", PS, "DRaFT", "DrPO", 24.69, 23.49, "summary", "draft", "drpo", "reward"),
    Finding("main", PS, "VGGFlow", "DrPO", 23.73, 23.49, "summary", "vggflow", "drpo", "reward"),
    Finding("main", PS, "DrPO", "DPO 1step", 23.49, 22.02, "summary", "drpo", "dpo", "reward"),
    Finding("main", PS, "DrPO", "GRPO 1step", 23.49, 21.98, "summary", "drpo", "grpo", "reward"),
    Finding("main", PS, "DrPO", "PSO", 23.49, 21.88, "summary", "drpo", "pso", "reward"),
    # GenEval, SD-Turbo -> +DrPO, trained on GenEval's detector (the default recipe's analogue).
    Finding("GenEval", "GenEval overall (%), mean of the six tasks", "DrPO", "base",
            round(sum(after for _, after in GENEVAL_TASKS.values()) / 6, 2),
            round(sum(before for before, _ in GENEVAL_TASKS.values()) / 6, 2),
            "summary", "drpo", "base", "geneval_overall"),
    *[Finding("GenEval", f"GenEval {task} (%)", "DrPO", "base", after, before, "summary", "drpo", "base",
              f"geneval_{task}") for task, (before, after) in GENEVAL_TASKS.items()],
    # The SD-Turbo ablations (PickScore ×100); ours are judged on the default recipe's target, the detector.
    Finding("candidates K", PS, "K=24", "K=16", 23.53, 23.24, "ablation_candidates", "24", "16", "reward_detector"),
    Finding("candidates K", PS, "K=32", "K=24", 23.57, 23.53, "ablation_candidates", "32", "24", "reward_detector"),
    Finding("feature space", PS, "latent MAE", "raw latent", 23.55, 20.52, "ablation_features", "latent_mae",
            "raw_latent", "reward_detector"),
    Finding("feature space", PS, "latent MAE", "decoded pixels + image encoder (DINOv2; ours: CLIP vision)",
            23.55, 22.28, "ablation_features", "latent_mae", "clip_image", "reward_detector"),
    Finding("kernel", PS, "cosine", "laplacian", 23.63, 23.51, "ablation_kernel", "cosine", "laplacian",
            "reward_detector"),
    Finding("kernel", PS, "laplacian", "rbf", 23.51, 23.50, "ablation_kernel", "laplacian", "rbf", "reward_detector"),
    Finding("anchor weight eta", PS, "eta=3000", "eta=1000", 23.53, 23.51, "ablation_anchor_weight", "3000", "1000",
            "reward_detector"),
    Finding("anchor weight eta", PS, "eta=3000", "eta=10000", 23.53, 23.46, "ablation_anchor_weight", "3000",
            "10000", "reward_detector"),
    Finding("reference objective", PS, "none", "reference drift", 23.55, 23.49, "ablation_reference", "none",
            "reference_drift", "reward_detector"),
    Finding("reference objective", PS, "none", "perceptual", 23.55, 23.42, "ablation_reference", "none",
            "perceptual", "reward_detector"),
    Finding("reference objective", "SD-Turbo, HPSv2 (held out)", "reference drift", "none", 35.07, 34.85,
            "ablation_reference", "reference_drift", "none", "reward_heldout"),
]


def verdict(paper_delta: float, ours_delta: float, ours_spread: float) -> str:
    """Our difference against the paper's ordering: within the seeds' spread (the two rows' std over training
    seeds, added in quadrature; 0 with one seed), else agrees or disagrees."""
    if abs(ours_delta) <= ours_spread:
        return "within seed spread"
    return "agrees" if (ours_delta > 0) == (paper_delta > 0) else "disagrees"


def compare(tables_dir: str | Path, setting: str) -> pd.DataFrame:
    """One row per finding: the paper's two numbers and difference, ours (from the tables in ``tables_dir``) and
    the verdict; findings whose table or rows are absent say "not run"."""
    tables: dict[str, pd.DataFrame] = {}
    for name in {finding.table for finding in FINDINGS}:
        path = Path(tables_dir) / f"{name}.csv"
        if path.exists():
            frame = pd.read_csv(path)
            label = "method" if name == "summary" else "variant"
            tables[name] = frame.astype({label: str}).set_index(label)
    rows = []
    for finding in FINDINGS:
        row = {"topic": finding.topic, "paper: higher > lower": f"{finding.higher} > {finding.lower}",
               "paper metric": finding.paper_metric,
               "paper": f"{finding.paper_higher:.2f} vs {finding.paper_lower:.2f}",
               "paper Δ": round(finding.paper_higher - finding.paper_lower, 2),
               "setting": setting, "our metric": OUR_METRICS.get(finding.metric, finding.metric)}
        table = tables.get(finding.table)
        present = (table is not None and finding.metric in table
                   and {finding.ours_higher, finding.ours_lower} <= set(table.index))
        if not present:
            rows.append(row | {"ours": "", "ours Δ": None, "our seeds": None,
                               "verdict": f"not run ({finding.table})"})
            continue
        high, low = table.loc[finding.ours_higher], table.loc[finding.ours_lower]
        delta = float(high[finding.metric] - low[finding.metric])
        spread = float((high.get(f"{finding.metric}_std", 0.0) ** 2 + low.get(f"{finding.metric}_std", 0.0) ** 2)
                       ** 0.5)
        # The trained rows' training seeds: the base row is one untrained generator, listed with 1 seed.
        seeds = int(max(high.get("seeds", 1), low.get("seeds", 1)))
        rows.append(row | {"ours": f"{high[finding.metric]:.2f} vs {low[finding.metric]:.2f}",
                           "ours Δ": round(delta, 2), "our seeds": seeds,
                           "verdict": verdict(finding.paper_higher - finding.paper_lower, delta, spread)})
    return pd.DataFrame.from_records(rows)


def write_comparison(tables_dir: str | Path, setting: str, out_md: str | Path) -> pd.DataFrame:
    """The paper-vs-ours table as Markdown, with a count of the verdicts, and as CSV and HTML next to it."""
    table = compare(tables_dir, setting).astype({"our seeds": "Int64"})
    counts = table["verdict"].str.replace(r" \(.*\)$", "", regex=True).value_counts()
    note = (f"Paper (method spec section 10, SD-Turbo) vs ours ({setting}). Ours: mean over training seeds; 'within "
            "seed spread' when our difference is no larger than the two rows' std over seeds added in quadrature. "
            "Verdicts: " + ", ".join(f"{count} {name}" for name, count in counts.items()) + ".")
    header = list(table.columns)
    rows = [["" if pd.isna(value) else str(value) for value in row] for row in table.itertuples(index=False)]
    Path(out_md).write_text(note + "\n\n" + markdown(header, rows))
    Path(out_md).with_suffix(".html").write_text(html(header, rows, "The paper's numbers next to ours", note))
    table.to_csv(Path(out_md).with_suffix(".csv"), index=False)
    return table
