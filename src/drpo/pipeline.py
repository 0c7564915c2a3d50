"""What each workflow stage does, given the validated config. The Snakemake scripts call these.

Every stage takes plain paths so it can also be run from Python or a notebook.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from drpo.config import resolve_device
from drpo.prompt_files import read_rows
from drpo.provenance import write_provenance


# ----------------------------------------------------------------------------------- components
def load_models(config: dict, *, features: bool = True):
    """(generator, reward, feature encoder or None) as configured, on the configured device."""
    from drpo.features import build_features_from_config
    from drpo.rewards import build_reward_from_config

    device = resolve_device(config["device"])
    generator = load_generator_at(config)
    reward = build_reward_from_config(config["models"]["reward"], device=device)
    encoder = build_features_from_config(config["models"]["features"], generator, device) if features else None
    return generator, reward, encoder


def load_generator_at(config: dict, checkpoint: str | Path | None = None):
    """The configured generator, on the configured device, with a run's LoRA checkpoint folder loaded (the frozen
    base when ``checkpoint`` is None)."""
    from drpo.generators import load_generator
    from drpo.lora import load_lora

    spec = config["models"]["generator"]
    generator = load_generator(spec["path"], spec["kind"], device=resolve_device(config["device"]))
    if checkpoint is not None:
        load_lora(generator.unet, checkpoint)
    return generator


def world_spec(config: dict):
    from drpo.world.spec import WorldSpec

    return WorldSpec.from_dict(config["world"]["spec"]) if config["world"]["enabled"] else None


# ----------------------------------------------------------------------------------- stages
def make_world(config: dict, train_out: str | Path, test_out: str | Path) -> None:
    from drpo.world.prompts import make_splits, write_metadata_jsonl

    world = config["world"]
    train_rows, test_rows = make_splits(world_spec(config), n_train=world["n_train_prompts"],
                                        n_test=world["n_test_prompts"], seed=world["split_seed"])
    write_metadata_jsonl(train_rows, train_out)
    write_metadata_jsonl(test_rows, test_out)


def make_reference_bank(config: dict, prompts_path: str | Path, bank_out: str | Path) -> None:
    from drpo.reference import build_reference_bank

    generator = load_generator_at(config)
    rows = read_rows(prompts_path)
    train = config["train"]
    bank = build_reference_bank(generator, [row["prompt"] for row in rows],
                                candidates=train["candidates"], noise_sets=train["reference_noise_sets"],
                                seed=0, batch_size=config["evaluate"]["batch_size"])
    bank.save(bank_out)


def make_world_preferences(config: dict, prompts_path: str | Path, out: str | Path, format: str,
                           log=print) -> dict:
    """The miniature world's preference dataset from the training prompts (drpo.world.preferences), in ``format``
    (jsonl: ``out`` is the JSONL file; pickapic: ``out`` is the shard folder); returns its counts."""
    from drpo.world.preferences import (
        generated_preferences,
        render_preferences,
        write_jsonl_dataset,
        write_pickapic_dataset,
    )

    world, spec = config["preferences"]["world"], world_spec(config)
    rows = read_rows(prompts_path)
    counts = {"prompts": len(rows)}
    sizes = {"chosen": world["chosen_per_prompt"], "rejected": world["rejected_per_prompt"], "seed": world["seed"]}
    if world["kind"] == "renders":
        preferences = render_preferences(rows, spec, **sizes)
    else:
        preferences = generated_preferences(rows, spec, load_generator_at(config), candidates=world["candidates"],
                                            batch_size=config["evaluate"]["batch_size"], stats=counts, **sizes)
    if format == "jsonl":
        counts |= write_jsonl_dataset(preferences, out)
    else:
        counts |= write_pickapic_dataset(preferences, out, spec, seed=world["seed"])
    log(f"{world['kind']} preference dataset ({format}) at {out}: {json.dumps(counts)}")
    return counts


def make_preference_latents(config: dict, dataset: str | Path, done_out: str | Path, log=print) -> dict:
    """Encode the preference dataset's images with the generator's VAE into the cache folder of ``done_out``
    (drpo.preferences.build_latent_cache: incremental, a rerun continues); returns its done record."""
    from drpo.preferences import build_latent_cache

    generator = load_generator_at(config)
    path = Path(config["models"]["generator"]["path"])
    # What the cache's latents depend on besides the dataset: the VAE's weights (their files' sizes and times).
    stamps = sorted(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in (path / "vae").iterdir())
    section = config["preferences"]
    return build_latent_cache(dataset, Path(done_out).parent, generator.vae, resolution=generator.resolution,
                              format=section["format"], encode=section["encode"], chunk_rows=section["chunk_rows"],
                              max_rows=section["max_rows"], model={"generator": str(path), "vae_files": stamps},
                              log=log)


def run_settings(config: dict, method: str, seed: int) -> dict:
    """What one training run depends on: the method's section (and the sections whose settings it reuses, and the
    preference dataset for an offline method), the models, the train settings that shape it, as the method resolves
    them (train.per_method; not the list of methods and seeds, nor the process count, which changes no result) and
    its length. The train rule declares it as params, so a change reruns exactly the runs it concerns: another
    method's entry in train.per_method, or an entry that changes nothing, leaves it as it was."""
    from drpo.config import method_train
    from drpo.methods import METHODS

    train = method_train(config["train"], method)
    # learning_rate last: Snakemake compares params by their repr, so the keys keep the order they had when
    # this was train.learning_rates' pick, and existing runs are not rerun.
    shared = {key: value for key, value in train.items()
              if key not in ("methods", "seeds", "learning_rate", "per_method", "processes", "main_process_port")}
    cls = METHODS[method]
    reused = {section: config[section] for section in cls.shared_settings}
    data = {"preferences": config["preferences"]} if cls.uses_preference_data else {}
    return {"method": method, "seed": seed, method: config.get(method, {}), **reused, **data,
            "models": config["models"], "train": shared | {"learning_rate": train["learning_rate"]}}


def run_identity(config: dict, method: str, seed: int, rows: list[dict]) -> dict:
    """What a run folder belongs to (drpo.run_folder.claim): the run's settings without its length, which training
    can extend by resuming, and a digest of its training prompts."""
    import hashlib

    identity = run_settings(config, method, seed)
    identity["train"] = {k: v for k, v in identity["train"].items() if k not in ("steps", "checkpoint_every")}
    rows_json = json.dumps(rows, sort_keys=True).encode()
    return identity | {"prompts_sha256": hashlib.sha256(rows_json).hexdigest()}


def run_training(config: dict, method_name: str, seed: int, prompts_path: str | Path, run_dir: str | Path,
                 *, bank_path: str | Path | None = None, preferences_path: str | Path | None = None,
                 log=print) -> Path:
    """Train one (method, seed) run; the frozen base's samples come from the bank when one is given. A method that
    trains from a preference dataset reads it from the latent cache whose ``done.json`` is ``preferences_path``: its
    rows are the training prompts (with the GenEval rows of the training prompts they match, for tag balancing)."""
    from drpo.config import method_config
    from drpo.methods import build_method
    from drpo.preferences import LatentCache, PreferenceSource
    from drpo.reference import OnlineReference, ReferenceBank
    from drpo.train import TrainSettings, train

    config = method_config(config, method_name)  # train as this method's runs use it (train.per_method)
    generator, reward, features = load_models(config)
    method = build_method(method_name, generator, reward, features, config)
    rows = read_rows(prompts_path)
    prompts = [row["prompt"] for row in rows]
    identity = run_identity(config, method_name, seed, rows)
    metadata = rows
    if method.uses_preference_data:
        if preferences_path is None or bank_path is not None:
            raise ValueError(f"method {method_name!r} trains from a preference dataset: give it the latent cache "
                             "(preferences_path, the preference_latents rule's done.json) and no reference bank")
        cache = LatentCache(Path(preferences_path).parent)
        by_prompt = {row["prompt"]: row for row in rows}
        metadata = [by_prompt.get(prompt) for prompt in cache.prompts]
        metadata = None if None in metadata else metadata
        source = PreferenceSource(cache, OnlineReference(generator, cache.prompts,
                                                         candidates=config["train"]["candidates"], seed=seed))
        identity["preferences_sha256"] = cache.digest
    elif bank_path is not None:
        source = ReferenceBank.load(bank_path)
        if source.prompts != prompts:
            raise ValueError(f"reference bank {bank_path} was built for other prompts than {prompts_path}; "
                             "rerun the reference_bank rule")
    else:
        source = OnlineReference(generator, prompts, candidates=config["train"]["candidates"], seed=seed)
    settings = TrainSettings.from_config(config["train"], seed)
    return train(method, source, settings, run_dir, identity=identity, metadata=metadata, log=log,
                 provenance=lambda folder: write_provenance(folder, config, {"method": method_name, "seed": seed}))


def run_evaluation(config: dict, prompts_path: str | Path, summary_out: str | Path,
                   per_image_out: str | Path, *, method: str, seed: int, step: int,
                   run_dir: str | Path | None = None) -> dict:
    """Evaluate the base (run_dir None) or the checkpoint ``step`` of the run in ``run_dir``."""
    import pandas as pd

    from drpo.evaluate import evaluation_seeds, sample_latents, score_latents, summarize
    from drpo.lora import load_lora
    from drpo.run_folder import CHECKPOINT_PREFIX

    from drpo.rewards import build_reward_from_config

    generator, reward, _ = load_models(config, features=False)
    device = str(generator.device)
    held_out = {label: build_reward_from_config({"name": label} | spec, device=device)
                for label, spec in config["evaluate"]["rewards"].items() if spec is not None}
    adapters = run_dir is not None
    if adapters:
        load_lora(generator.unet, Path(run_dir) / "checkpoints" / f"{CHECKPOINT_PREFIX}{step}")
    rows = read_rows(prompts_path)
    evaluation = config["evaluate"]
    if evaluation["max_prompts"]:
        rows = rows[: evaluation["max_prompts"]]
    images_dir = Path(summary_out).parent / "geneval_samples" if evaluation["save_images"] else None
    # The world's detector judges GenEval metadata rows; a stand-in set of plain prompts (Parti, Pick-a-Pic) has none.
    detector = world_spec(config) if all("include" in row for row in rows) else None
    # Prompts that share a seed list (those of one tag) are sampled and scored together.
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, seeds in enumerate(evaluation_seeds(rows, evaluation["seeds"], evaluation["min_images_per_tag"])):
        groups.setdefault(tuple(seeds), []).append(index)
    images, prompts = [], []
    for seeds, indices in groups.items():
        group_rows = [rows[i] for i in indices]
        latents = sample_latents(generator, [row["prompt"] for row in group_rows], list(seeds),
                                 batch_size=evaluation["batch_size"], adapters=adapters, prompt_indices=indices)
        image_table, prompt_table = score_latents(
            generator, reward, latents, group_rows, list(seeds), batch_size=evaluation["batch_size"],
            world_spec=detector, images_dir=images_dir, held_out=held_out,
            diversity_from=evaluation["diversity_from"], prompt_indices=indices)
        images.append(image_table)
        prompts.append(prompt_table)
    per_image = pd.concat(images).sort_values(["prompt_index", "seed"], ignore_index=True)
    per_prompt = pd.concat(prompts).sort_values("prompt_index", ignore_index=True)
    per_image = per_image.merge(per_prompt, on="prompt_index")
    per_image.to_parquet(per_image_out, index=False)
    summary = {"method": method, "seed": seed, "step": step,
               **summarize(per_image, per_prompt, reward_scale=reward.report_scale,
                           held_out_scales={label: r.report_scale for label, r in held_out.items()})}
    Path(summary_out).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def make_report(summary_files: list[str], tables_dir: str | Path, reward_png: str | Path,
                geneval_png: str | Path | None = None, tasks_png: str | Path | None = None) -> None:
    """Tables, the reward curves (target, held-out, GenEval-lite overall and strict, diversity) and, in the
    miniature world, the per-task GenEval-lite curves (GenEval's semantics above, strict below) and bars."""
    from drpo.evaluate import GENEVAL_TAGS
    from drpo.report import collect, metric_columns, plot_curves, plot_task_bars, write_tables

    steps = collect(summary_files)
    table = write_tables(steps, tables_dir)
    plot_curves(steps, [m for m in metric_columns(steps) if m.startswith("reward") or m in
                        ("geneval_overall", "geneval_strict_overall", "diversity")], reward_png)
    if geneval_png is not None:
        plot_curves(steps, [f"{prefix}_{tag}" for prefix in ("geneval", "geneval_strict") for tag in GENEVAL_TAGS],
                    geneval_png, columns=len(GENEVAL_TAGS))
    if tasks_png is not None:
        plot_task_bars(table, tasks_png)


@torch.no_grad()
def make_grid(config: dict, prompts_path: str | Path, run_dir: str | Path, method: str,
              out_png: str | Path) -> None:
    from drpo.evaluate import sample_images
    from drpo.report import plot_grid
    from drpo.run_folder import latest_checkpoint

    generator = load_generator_at(config, latest_checkpoint(run_dir))
    rows = read_rows(prompts_path)
    indices = [i for i in config["report"]["grid_prompts"] if i < len(rows)]
    seeds = config["report"]["grid_seeds"]
    prompts = [rows[i]["prompt"] for i in indices]

    def images(adapters: bool):
        pixels = sample_images(generator, prompts, seeds, batch_size=config["evaluate"]["batch_size"],
                               adapters=adapters, prompt_indices=indices)
        return pixels.reshape(len(prompts), len(seeds), *pixels.shape[1:])

    plot_grid(images(False), images(True), prompts, out_png, tuned_label=method)


def judge_images(config: dict, checkpoint: str | Path | None, rows: list[dict],
                 keys: list[tuple[int, int]]) -> dict:
    """uint8 images of the generator (with the LoRA ``checkpoint``, or the base for None) for every (prompt index,
    seed) key, with the evaluation's noise for the key (drpo.evaluate.sample_images); the generator is freed after."""
    import gc

    from drpo.evaluate import sample_images

    generator = load_generator_at(config, checkpoint)
    by_seed: dict[int, list[int]] = {}
    for index, seed in keys:
        by_seed.setdefault(seed, []).append(index)
    images = {}
    for seed, indices in by_seed.items():
        pixels = sample_images(generator, [rows[i]["prompt"] for i in indices], [seed],
                               batch_size=config["evaluate"]["batch_size"], adapters=checkpoint is not None,
                               prompt_indices=indices)
        images.update({(index, seed): image for index, image in zip(indices, pixels)})
    del generator
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return images


def run_judge(config: dict, prompts_path: str | Path, prompt_set: str, methods: tuple[str, str],
              checkpoints: tuple[str | Path | None, str | Path | None], verdicts_out: str | Path,
              summary_out: str | Path, *, run: dict | None = None, log=print) -> dict:
    """The judge's verdicts on one pair of models over one prompt set (method spec 5.4): ``methods`` (A, B) with
    their LoRA checkpoint folders (None for the base), on the keys of drpo.judge.pair_keys for judge.seeds. Writes
    the verdicts (parquet, and the same as CSV beside it) and summary.json (with ``run``: the training seed and step
    judged)."""
    import time

    from drpo.judge import Judge, judge_pairs, pair_keys, summarize

    settings = config["judge"]
    rows = read_rows(prompts_path)
    keys = pair_keys(len(rows), settings["seeds"], settings["max_pairs"], settings["subset_seed"])
    started = time.time()
    images = [judge_images(config, checkpoint, rows, keys) for checkpoint in checkpoints]
    log(f"sampled {len(keys)} images of each of {methods[0]} and {methods[1]} in {time.time() - started:.1f} s")
    judge = Judge.load(settings["model"], device=resolve_device(config["device"]), dtype=settings["dtype"],
                       max_new_tokens=settings["max_new_tokens"])
    started = time.time()
    verdicts = judge_pairs(judge, keys, [row["prompt"] for row in rows], *images, names=methods,
                           batch_size=settings["batch_size"], log=log)
    seconds = time.time() - started
    verdicts.to_parquet(verdicts_out, index=False)
    verdicts.to_csv(Path(verdicts_out).with_suffix(".csv"), index=False)
    summary = {"prompt_set": prompt_set, "method_a": methods[0], "method_b": methods[1], **summarize(verdicts),
               "judge": str(settings["model"]), **(run or {}), "seeds": settings["seeds"],
               "seconds_per_pair": round(seconds / max(len(keys), 1), 4)}
    Path(summary_out).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
