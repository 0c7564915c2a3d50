"""The compute-cost report: analytic FLOPs, measured seconds and the paper's numbers side by side.

``cost_table`` puts every source in one table, one block of two rows (DRaFT, DrPO) per setting, with the
per-component cost, the update total, the backward share and the speed-up DRaFT / method (the paper's table:
DRaFT 1.00x, DrPO 3.51x). ``plot_components`` draws one stacked bar per method and setting.
``measure_miniature`` and ``run_analytic`` are what the workflow rules call.
"""

from __future__ import annotations

import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from drpo.config import merge  # noqa: E402
from drpo.cost.flops import Models, UpdateShape, analytic_table, count, update_flops  # noqa: E402
from drpo.cost.profile import device_name, profile_updates, summarize  # noqa: E402
from drpo.methods.base import COMPONENTS, settings_from_section  # noqa: E402
from drpo.methods.drpo import DrPOSettings  # noqa: E402
from drpo.report import html  # noqa: E402

# Spec section 6 (website table "Efficiency comparison on HPSv3"): SD-Turbo, HPSv3, 4 processes x 2 x 24 = 192
# candidates per update; DRaFT with the reward checkpointed; seconds per update, averaged over 20 updates.
PAPER = {"draft": {"update": 21.62, "backward": 9.99}, "drpo": {"update": 6.17, "backward": 0.34}}
PAPER_SETTING = "paper: sd-turbo + hpsv3, 4 GPUs x 2 x K=24, DRaFT reward ckpt on"
METHOD_LABELS = {"drpo": "DrPO", "draft": "DRaFT"}
COLORS = dict(zip((*COMPONENTS, "other"), plt.get_cmap("tab10").colors + ((0.88, 0.88, 0.88),)))


def _block(setting: str, source: str, unit: str, values: dict[str, dict[str, float]],
           extra: dict[str, dict[str, float]] | None = None) -> list[dict]:
    """Rows of one setting: values[method] = {component or "update": cost}; speed-up = DRaFT / method."""
    rows = []
    for method in ("draft", "drpo"):
        row = {"source": source, "setting": setting, "method": method, "unit": unit, **values[method],
               **(extra or {}).get(method, {})}
        row["backward_share"] = row.get("backward", float("nan")) / row["update"]
        row["speedup"] = values["draft"]["update"] / row["update"]
        rows.append(row)
    return rows


def _analytic_rows(analytic: pd.DataFrame) -> list[dict]:
    rows = []
    for (generator, reward), part in analytic.groupby(["generator", "reward"], sort=False):
        drpo = part[part["method"] == "drpo"].set_index("component")["flops"] / 1e15
        for flag, draft in part[part["method"] == "draft"].groupby("reward_checkpointing", sort=False):
            draft = draft.set_index("component")["flops"] / 1e15
            values = {m: {**s.to_dict(), "update": s.sum()} for m, s in (("draft", draft), ("drpo", drpo))}
            setting = f"{generator} + {reward}, DRaFT reward ckpt {'on' if flag else 'off'}"
            rows += _block(setting, "analytic (ours)", "PFLOP per update", values)
    return rows


def _profile_rows(profile: pd.DataFrame) -> list[dict]:
    rows = []
    for (setting, device), part in profile.groupby(["setting", "device"], sort=False):
        methods = {m: g.set_index("component") for m, g in part.groupby("method")}
        medians = {m: g["median_s"].to_dict() for m, g in methods.items()}
        spread = {m: {"update_min": g.loc["update", "min_s"], "update_max": g.loc["update", "max_s"],
                      "updates": int(g["updates"].max()), "peak_memory_gb": g["peak_memory_gb"].max()}
                  for m, g in methods.items()}
        rows += _block(f"{setting} [{device}]", "measured (ours)", "s per update (median)", medians, spread)
    return rows


def cost_table(analytic: pd.DataFrame | None, profiles: Sequence[pd.DataFrame] = ()) -> pd.DataFrame:
    """One table: analytic blocks (long table of drpo.cost.flops.analytic_table), measured blocks (summaries of
    drpo.cost.profile.summarize with "setting" and "device" columns) and the paper's block."""
    rows = _analytic_rows(analytic) if analytic is not None else []
    for profile in profiles:
        rows += _profile_rows(profile)
    rows += _block(PAPER_SETTING, "paper", "s per update (mean)", PAPER)
    columns = ["source", "setting", "method", "unit", *COMPONENTS, "update", "backward_share", "speedup",
               "update_min", "update_max", "updates", "peak_memory_gb"]
    return pd.DataFrame.from_records(rows).reindex(columns=columns)


def plot_components(table: pd.DataFrame, out: str | Path) -> None:
    """Stacked bars of per-component cost, one panel per setting, DRaFT and DrPO side by side."""
    settings = list(dict.fromkeys(table["setting"]))
    cols = min(4, len(settings))
    rows = -(-len(settings) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.6 * rows), squeeze=False)
    for ax, setting in zip(axes.flat, settings):
        block = table[table["setting"] == setting].set_index("method")
        for x, method in enumerate(("draft", "drpo")):
            row = block.loc[method]
            parts = {c: row[c] for c in COMPONENTS if pd.notna(row[c])}
            parts["other"] = row["update"] - sum(parts.values())  # not itemised (paper) or between timers
            bottom = 0.0
            for component, value in parts.items():
                if value > 0:
                    ax.bar(x, value, bottom=bottom, color=COLORS[component], width=0.6)
                    bottom += value
            ax.text(x, bottom, f"{row['speedup']:.2f}x", ha="center", va="bottom", fontsize=8)
        ax.set_xticks([0, 1], [METHOD_LABELS[m] for m in ("draft", "drpo")])
        ax.set_ylabel(block["unit"].iloc[0], fontsize=8)
        ax.set_title(textwrap.fill(setting, 52), fontsize=7)
        ax.margins(y=0.12)
    for ax in list(axes.flat)[len(settings):]:
        ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[c]) for c in COLORS]
    fig.legend(handles, list(COLORS), loc="lower center", ncol=6, fontsize=7, frameon=False)
    fig.suptitle("Cost of one update by component (speed-up = DRaFT / method)", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)


def write_report(analytic_csv: str | Path | None, profile_csvs: Sequence[str | Path], table_out: str | Path,
                 figure_out: str | Path) -> pd.DataFrame:
    """Read the analytic and measured CSVs, write the table (CSV, and HTML next to it) and the figure (PNG); return
    the table."""
    analytic = pd.read_csv(analytic_csv) if analytic_csv else None
    table = cost_table(analytic, [pd.read_csv(path) for path in profile_csvs])
    Path(table_out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(table_out, index=False)
    cells = table.round(4).astype(str).replace({"nan": ""})
    Path(table_out).with_suffix(".html").write_text(html(list(table.columns), cells.values.tolist(),
                                                         "Cost of one DrPO and one DRaFT update, per component"))
    plot_components(table, figure_out)
    return table


def drpo_settings(config: dict, num_pos: int, num_neg: int) -> DrPOSettings:
    """The config's DrPO settings with the anchor counts of a cost protocol."""
    return settings_from_section(DrPOSettings, config["drpo"] | {"num_pos": num_pos, "num_neg": num_neg})


def run_analytic(section: dict, drpo: dict, out_csv: str | Path, log: Callable[[str], None] = print) -> pd.DataFrame:
    """Analytic FLOPs of the configured paper settings (config sections ``cost.analytic`` and ``drpo``), as CSV."""
    shape = UpdateShape(processes=section["processes"], accumulation=section["accumulation"],
                        candidates=section["candidates"], online_reference=True, reward_checkpointing=True,
                        drpo=drpo_settings({"drpo": drpo}, section["num_pos"], section["num_neg"]))
    table = analytic_table(section["generators"], section["rewards"], shape, log=log,
                           reward_options={"hpsv3": {"text_tokens": section["hpsv3_text_tokens"]}})
    Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_csv, index=False)
    return table


@torch.no_grad()
def reward_to_unet_flops(models: Models, prompt: str) -> float:
    """FLOPs of scoring one image / FLOPs of generating it (one UNet call): > 1 for HPSv3 on SD-Turbo (8.0)."""
    gen = models.generator
    cond = gen.encode_prompts([prompt])
    latents, unet = count(gen.sample, cond, torch.zeros(1, *gen.latent_shape, device=gen.device))
    _, reward = count(models.reward.score, gen.decode(latents), [prompt])
    return reward / unet


def miniature_models(config: dict, prompts: Sequence[str], *, reward_hidden: int | None, reward_layers: int,
                     work_dir: str | Path) -> tuple[Models, str]:
    """Models for the measured miniature profile; returns them (LoRA added as configured) and a label.

    Generator and features: the configured ones (the miniature's trained models, or the paper's with a paper
    preset) when their files exist, else tiny random stand-ins written to ``work_dir`` (32 px images, 8 x 8 x 4
    latents, small enough for a CPU budget). Reward: a random CLIP ``reward_hidden`` wide and ``reward_layers``
    deep on the generator's images (patch 4), so that, as HPSv3 is for SD-Turbo, scoring an image costs more
    than generating it (the trained miniature reward is far cheaper than its generator); ``reward_hidden`` None
    times the configured reward itself (use it with paper presets).
    """
    from drpo.config import resolve_device
    from drpo.features.latent_mae import LatentMAEEncoder, LatentMAEFeatures, save_checkpoint
    from drpo.generators import load_generator
    from drpo.lora import add_lora
    from drpo.pipeline import load_models
    from drpo.rewards import PickScoreReward
    from drpo.tiny import tiny_vae_config, write_tiny_clip, write_tiny_sd_turbo

    spec = config["models"]
    device = resolve_device(config["device"])
    root = Path(work_dir)
    words = sorted({word for prompt in prompts for word in prompt.split()})
    paths = [Path(spec["generator"]["path"]) / "model_index.json"]
    if spec["features"].get("checkpoint"):
        paths.append(Path(spec["features"]["checkpoint"]))
    if reward_hidden is None:
        paths.append(Path(spec["reward"]["path"]) / "config.json")
    if all(p.exists() for p in paths):
        generator, reward, features = load_models(config)
        label = "configured models"
    else:
        write_tiny_sd_turbo(root / "generator", words=words, sample_size=8, block_out_channels=(32, 64),
                            vae_config=tiny_vae_config(block_out_channels=(16, 32, 32), latent_size=8))
        torch.manual_seed(0)
        save_checkpoint(LatentMAEEncoder(layers=(1, 1, 1, 1), widths=(16, 32, 64, 64)), root / "mae.pth")
        generator = load_generator(root / "generator", "sd-turbo", device=device)
        features = LatentMAEFeatures(root / "mae.pth", keys=spec["features"]["keys"]).to(device)
        reward = None
        label = "miniature stand-in"
    if reward_hidden is not None:
        image_size = generator.resolution
        write_tiny_clip(root / "reward", words=words, image_size=image_size, hidden=reward_hidden,
                        layers=reward_layers, patch_size=4, projection_dim=64, model_max_length=77)
        reward = PickScoreReward(root / "reward", device=generator.device)
        label += f" + reward CLIP {reward_hidden}x{reward_layers}"
    lora = config["train"]["lora"]
    params = add_lora(generator.unet, rank=lora["rank"], alpha=lora["alpha"], dropout=lora["dropout"],
                      targets=tuple(lora["targets"]))
    return Models(generator, params, reward, features), label


def measured_config(config: dict) -> dict:
    """The config the measured profile trains with: the configured one with the protocol of ``cost.measured``
    (K, prompts per update and DrPO's anchors; one process). Every measured method runs this one protocol, so
    train.per_method does not apply here: the cost report compares methods at matched shapes."""
    section = config["cost"]["measured"]
    return merge(config, {"train": {"candidates": section["candidates"], "prompts_per_step": section["accumulation"],
                                    "processes": 1},
                          "drpo": {"num_pos": section["num_pos"], "num_neg": section["num_neg"]}})


def measure_miniature(config: dict, rows: Sequence[dict], out_csv: str | Path,
                      log: Callable[[str], None] = print) -> pd.DataFrame:
    """Time real DrPO and DRaFT updates of the miniature on this machine (config section ``cost.measured``).

    The methods are the training code's own (drpo.methods.build_method on :func:`measured_config`), updated by
    the training loop's update step. Torch uses ``threads`` CPU threads (1 on a shared machine: more threads
    than free cores slow small models down many-fold). Runs: DrPO, and DRaFT once per value of ``draft_chunks``
    (its candidates per backward: 1 = the paper's streaming, K = batched), timed in turns
    (drpo.cost.profile.profile_updates); each DRaFT run forms one setting with the DrPO timings. The label
    carries the FLOP ratios of these very models (reward / UNet per image, DRaFT / DrPO per update).
    """
    from drpo.methods import build_method
    from drpo.reference import OnlineReference
    from drpo.train import TrainSettings

    section = config["cost"]["measured"]
    config = measured_config(config)
    torch.set_num_threads(section["threads"])
    prompts = [row["prompt"] for row in rows]
    settings = TrainSettings.from_config(config["train"], section["seed"])
    with tempfile.TemporaryDirectory() as work_dir:
        models, label = miniature_models(config, prompts, reward_hidden=section["reward_hidden"],
                                         reward_layers=section["reward_layers"], work_dir=work_dir)
        shape = UpdateShape(processes=1, accumulation=section["accumulation"], candidates=section["candidates"],
                            drpo=drpo_settings(config, section["num_pos"], section["num_neg"]),
                            online_reference=section["online_reference"], reward_checkpointing=True)
        flops = {m: sum(update_flops(m, models, shape).values()) for m in ("drpo", "draft")}
        label += (f" (reward / UNet FLOPs {reward_to_unet_flops(models, prompts[0]):.1f}x, "
                  f"DRaFT / DrPO FLOPs {flops['draft'] / flops['drpo']:.2f}x)")
        build = [("drpo", config)] + [("draft", merge(config, {"draft": {"candidates_per_backward": chunk}}))
                                      for chunk in section["draft_chunks"]]
        methods = [build_method(name, models.generator, models.reward, models.features, method_config)
                   for name, method_config in build]
        source = OnlineReference(models.generator, prompts, candidates=section["candidates"], seed=section["seed"])
        began = time.monotonic()
        metadata = list(rows) if all("tag" in row for row in rows) else None
        summary = summarize(profile_updates(methods, models.params, source, settings, metadata=metadata,
                                            warmup=section["warmup"], updates=section["updates"],
                                            online_reference=section["online_reference"]))
        log(f"{label}: {len(methods)} runs x {section['updates']} updates in {time.monotonic() - began:.1f} s")
        device = device_name(models.generator.device)
    drpo = summary[summary["run"] == 0]
    blocks = []
    for run, chunk in enumerate(section["draft_chunks"], start=1):
        setting = (f"{label}, {settings.prompts_per_step} x K={settings.candidates}, DRaFT {chunk} candidate"
                   f"{'s' if chunk > 1 else ''} per backward, decode + reward recomputed in backward")
        blocks.append(pd.concat([drpo, summary[summary["run"] == run]]).assign(setting=setting, device=device))
    summary = pd.concat(blocks, ignore_index=True)
    Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
    summary.to_csv(out_csv, index=False)
    return summary
