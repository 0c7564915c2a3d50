"""The pairwise VLM judge (drpo.judge, method spec 5.4): answer parsing, the A/B swap, counting, and the stage end to
end on the miniature's random tiny Qwen2-VL."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from drpo.judge import (INVALID, Judge, is_swapped, judge_pairs, judge_table, outcome, pair_keys, parse_answer,
                        summarize, write_judge_table)

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("answer,label", [
    ('{"winner": "A", "confidence": 0.9, "reason": "follows the prompt"}', "A"),
    ('{"winner": "B", "confidence": 0.6, "reason": "sharper"}', "B"),
    ('{"winner": "tie", "confidence": 0.5, "reason": "equal"}', "tie"),
    ('```json\n{"winner": "B", "confidence": 0.7, "reason": "x"}\n```', "B"),
    ('Sure. Here is my verdict:\n```\n{"winner": "A"}\n```\nThanks', "A"),
    ('{"winner": "b", "confidence": 0.7}', "B"),  # lower case
    ('{"Winner": "Tie"}', "tie"),
    ('{"winner": "Image A", "reason": "the {red} circle"}', "A"),  # a brace inside a string
    ('{"winner": A, "confidence": 0.8}', "A"),  # broken JSON: the named winner
    ("The winner is image B.", "B"),
    ("winner: tie", "tie"),
    ("B", "B"),
    ("I prefer B: it has both squares.", "B"),
    ("It is a tie.", "tie"),
])
def test_parse_reads_json_fenced_json_and_prose(answer, label):
    assert parse_answer(answer).label == label


@pytest.mark.parametrize("answer", [
    "",
    "garbage \x06ue aWT(-",
    "A is sharper, but B follows the prompt better.",  # both letters, no decision
    "Either A or B, or a tie.",
    '{"winner": "C", "confidence": 0.4}',  # neither label, nothing else to read
    "a cat on a mat",  # a lower-case "a" is an article, not a vote
    '{"winner": "A" or "B" or "tie", "confidence": a number from 0 to 1}',  # the answer format repeated
])
def test_parse_calls_answers_without_a_single_label_invalid(answer):
    assert parse_answer(answer).label == INVALID


def test_parse_keeps_confidence_and_reason_and_drops_a_non_number():
    parsed = parse_answer('{"winner": "A", "confidence": 0.8, "reason": "red circle present"}')
    assert (parsed.confidence, parsed.reason) == (0.8, "red circle present")
    assert parse_answer('{"winner": "A", "confidence": "high"}').confidence is None


# ----------------------------------------------------------------------------------- the swap
def test_the_swap_is_a_deterministic_function_of_the_key_and_about_half_of_the_keys():
    keys = [(index, seed) for index in range(200) for seed in (42, 43)]
    swaps = [is_swapped(*key) for key in keys]
    assert swaps == [is_swapped(*key) for key in keys]
    assert 150 < sum(swaps) < 250
    # Not a function of the prompt or the seed alone.
    assert len({is_swapped(i, 42) for i in range(20)}) == 2 and len({is_swapped(0, s) for s in range(20)}) == 2


def test_answers_are_mapped_back_to_the_models():
    assert [outcome(label, False) for label in ("A", "B", "tie", INVALID)] == ["win", "loss", "tie", INVALID]
    assert [outcome(label, True) for label in ("A", "B", "tie", INVALID)] == ["loss", "win", "tie", INVALID]


class ScriptedJudge:
    """A judge that prefers the brighter image, or always answers ``fixed``; it records what it was shown."""

    def __init__(self, fixed=None):
        self.fixed, self.shown = fixed, []

    def answer(self, prompts, first, second):
        self.shown += [(int(a.mean()), int(b.mean())) for a, b in zip(first, second)]
        if self.fixed is not None:
            return [self.fixed] * len(prompts)
        return [json.dumps({"winner": "A" if a.mean() > b.mean() else "B"}) for a, b in zip(first, second)]


def _images(keys, value):
    return {key: np.full((8, 8, 3), value, dtype=np.uint8) for key in keys}


def test_the_pair_loop_shows_the_swapped_order_and_counts_in_the_pairs_terms():
    keys = pair_keys(10, [42, 43], None, 0)
    bright, dark = _images(keys, 200), _images(keys, 20)
    judge = ScriptedJudge()
    verdicts = judge_pairs(judge, keys, [f"prompt {i}" for i in range(10)], bright, dark, names=("drpo", "base"),
                           batch_size=3, log=lambda _: None)
    assert len(verdicts) == len(keys) and list(verdicts[["prompt_index", "seed"]].itertuples(index=False)) == keys
    # Whatever the order shown, the brighter model (A of the pair) wins every key.
    assert (verdicts["outcome"] == "win").all() and (verdicts["winner"] == "drpo").all()
    assert [shown == (20, 200) for shown in judge.shown] == list(verdicts["swapped"])
    assert (verdicts["shown_first"] == np.where(verdicts["swapped"], "base", "drpo")).all()
    assert verdicts["swapped"].any() and not verdicts["swapped"].all()
    assert set(verdicts["prompt"]) == {f"prompt {i}" for i in range(10)}

    # A judge that always names the first position: its votes split by the swap, not by the models.
    always_a = judge_pairs(ScriptedJudge('{"winner": "A"}'), keys, [""] * 10, bright, dark, names=("drpo", "base"),
                           batch_size=4, log=lambda _: None)
    assert (always_a["label"] == "A").all()
    assert list(always_a["outcome"] == "loss") == list(always_a["swapped"])


# ----------------------------------------------------------------------------------- counting
def _verdicts(outcomes):
    return pd.DataFrame({"outcome": outcomes, "swapped": [False] * len(outcomes)})


def test_summary_counts_and_both_rates():
    summary = summarize(_verdicts(["win"] * 5 + ["loss"] * 2 + ["tie"] * 2 + [INVALID]))
    assert {k: summary[k] for k in ("pairs", "wins", "losses", "ties", "invalid", "valid")} == {
        "pairs": 10, "wins": 5, "losses": 2, "ties": 2, "invalid": 1, "valid": 9}
    assert summary["win_rate_excluding_ties"] == pytest.approx(5 / 7)
    assert summary["preference_share"] == pytest.approx(6 / 9)


@pytest.mark.parametrize("outcomes,win_rate,share", [
    (["tie"] * 4, None, 0.5),            # no decided pair: no win rate, a tie is half a win
    ([INVALID] * 3, None, None),         # no valid answer: neither rate
    ([], None, None),
    (["win", INVALID, INVALID], 1.0, 1.0),
])
def test_summary_edge_cases_have_no_division_errors(outcomes, win_rate, share):
    summary = summarize(_verdicts(outcomes))
    assert summary["win_rate_excluding_ties"] == win_rate and summary["preference_share"] == share
    assert summary["invalid"] == outcomes.count(INVALID)


def test_pair_keys_cover_every_prompt_and_seed_or_a_fixed_random_subset():
    assert pair_keys(3, [42, 43], None, 0) == [(0, 42), (0, 43), (1, 42), (1, 43), (2, 42), (2, 43)]
    subset = pair_keys(50, [42, 43], 10, 0)
    assert len(subset) == 10 and subset == sorted(subset) and subset == pair_keys(50, [42, 43], 10, 0)
    assert subset != pair_keys(50, [42, 43], 10, 1)
    assert pair_keys(2, [1], 5, 0) == [(0, 1), (1, 1)]


def test_the_table_has_one_row_per_pair_and_percent_cells(tmp_path):
    files = []
    for b, outcomes in (("base", ["win", "win", "loss", "tie"]), ("dpo", [INVALID] * 2)):
        summary = {"prompt_set": "test", "method_a": "drpo", "method_b": b, **summarize(_verdicts(outcomes)),
                   "judge": "tiny", "train_seed": 0, "step": 4, "seeds": [42]}
        files.append(tmp_path / f"{b}.json")
        files[-1].write_text(json.dumps(summary))
    table = write_judge_table(files, tmp_path / "judge.csv", tmp_path / "judge.md", tmp_path / "judge.html")
    assert list(table["method_b"]) == ["base", "dpo"] and list(table["invalid"]) == [0, 2]
    csv = pd.read_csv(tmp_path / "judge.csv")
    assert csv.loc[0, "win_rate_excluding_ties"] == pytest.approx(2 / 3, abs=1e-4)
    assert math.isnan(csv.loc[1, "preference_share"])
    markdown = (tmp_path / "judge.md").read_text()
    assert "| test | drpo | base | 4 | 2 | 1 | 1 | 0 | 66.7 | 62.5 |" in markdown and "| – | – |" in markdown
    assert "Pairwise preference" in (tmp_path / "judge.html").read_text()


# ----------------------------------------------------------------------------------- the tiny real judge
@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory):
    from drpo.miniature.judge import build_tiny_judge

    folder = tmp_path_factory.mktemp("judge") / "tiny-qwen2-vl"
    build_tiny_judge(folder, words=["a photo of a red circle"], seed=0)
    return folder


def test_the_tiny_judge_is_a_qwen2_vl_folder_built_deterministically(tiny_judge, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    from drpo.miniature.judge import SPECIAL_TOKENS, build_tiny_judge

    config = AutoConfig.from_pretrained(tiny_judge)
    assert config.model_type == "qwen2_vl" and config.text_config.hidden_size == 32
    judge = Judge.load(tiny_judge, device="cpu", dtype="float32", max_new_tokens=4)
    assert isinstance(judge.model, Qwen2VLForConditionalGeneration)
    assert isinstance(judge.processor, Qwen2VLProcessor)
    tokenizer = judge.processor.tokenizer
    for token in SPECIAL_TOKENS:  # each a single id
        assert tokenizer.convert_ids_to_tokens(tokenizer(token)["input_ids"]) == [token]
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert tokenizer.tokenize(' {"winner": "tie"} red circle')[-2:] == ["Ġred", "Ġcircle"]
    build_tiny_judge(tmp_path / "again", words=["a photo of a red circle"], seed=0)
    first, second = load_file(tiny_judge / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert (tmp_path / "again" / "tokenizer.json").read_text() == (tiny_judge / "tokenizer.json").read_text()


def test_batched_answers_equal_one_at_a_time(tiny_judge):
    judge = Judge.load(tiny_judge, device="cpu", dtype="float32", max_new_tokens=6)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(4)]
    prompts = ["a red circle", "a photo of a blue square left of a green triangle"]
    batched = judge.answer(prompts, images[:2], images[2:])
    assert batched == [judge.answer([p], [a], [b])[0] for p, a, b in zip(prompts, images[:2], images[2:])]


def test_the_judge_stage_end_to_end_on_the_tiny_judge(tiny_config, tiny_judge, tmp_path):
    """Two models (the base, and a checkpoint of a fresh LoRA, which draws the same images for the same noises)
    judged by the random tiny Qwen2-VL: every key gets a verdict, garbage answers are counted as invalid."""
    from drpo.config import merge
    from drpo.judge import judged_seed, judged_step
    from drpo.lora import add_lora, save_lora
    from drpo.pipeline import judge_images, load_generator_at, run_judge

    from conftest import PROMPTS

    prompts = tmp_path / "test.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    generator = load_generator_at(tiny_config)
    add_lora(generator.unet, rank=4, alpha=4)
    checkpoint = tmp_path / "checkpoint-4"
    save_lora(generator.unet, checkpoint, kind="sd-turbo")
    config = merge(tiny_config, {"judge": {"model": str(tiny_judge), "seeds": [42, 43], "max_pairs": 5,
                                           "max_new_tokens": 12, "batch_size": 2}})
    assert (judged_seed(config), judged_step(config, "drpo"), judged_step(config, "base")) == (0, 4, 0)

    keys = pair_keys(len(PROMPTS), [42, 43], 5, 0)
    base, tuned = judge_images(config, None, [{"prompt": p} for p in PROMPTS], keys), judge_images(
        config, checkpoint, [{"prompt": p} for p in PROMPTS], keys)
    assert base.keys() == tuned.keys() == set(keys)
    assert all(np.abs(base[k].astype(int) - tuned[k].astype(int)).max() <= 1 for k in keys)  # same noise per key
    assert len({base[k].tobytes() for k in keys}) == len(keys)  # and a different one for every key

    verdicts_out, summary_out = tmp_path / "verdicts.parquet", tmp_path / "summary.json"
    summary = run_judge(config, prompts, "test", ("drpo", "base"), (checkpoint, None), verdicts_out, summary_out,
                        run={"train_seed": 0, "step_a": 4, "step_b": 0}, log=lambda _: None)
    verdicts = pd.read_parquet(verdicts_out)
    assert list(verdicts[["prompt_index", "seed"]].itertuples(index=False, name=None)) == keys
    assert verdicts["answer"].map(lambda a: isinstance(a, str)).all()
    assert set(verdicts["outcome"]) <= {"win", "loss", "tie", INVALID}
    assert (verdicts["valid"] == (verdicts["outcome"] != INVALID)).all()
    assert summary == json.loads(summary_out.read_text())
    assert summary["pairs"] == 5 and summary["wins"] + summary["losses"] + summary["ties"] + summary["invalid"] == 5
    assert summary["invalid"] == int((~verdicts["valid"]).sum()) and summary["invalid"] > 0  # random weights
    assert (summary["method_a"], summary["method_b"], summary["step_a"], summary["step_b"]) == ("drpo", "base", 4, 0)
    assert pd.read_csv(verdicts_out.with_suffix(".csv")).shape[0] == 5
    assert list(judge_table([summary_out])["pairs"]) == [5]


# ----------------------------------------------------------------------------------- config and assets
def test_the_config_names_every_problem_of_the_judge_section(tmp_path):
    from drpo.config import ConfigError, load_config

    for override, message in [({"pairs": [["drpo", "drpo"]]}, "compares drpo with itself"),
                              ({"pairs": [["drpo", "bsae"]]}, "unknown method 'bsae'"),
                              ({"step": 30}, r"judge.step \(30\) is not a checkpoint"),
                              ({"dtype": "float64"}, "float64"),
                              ({"pairs": [["drpo"]]}, "is too short")]:
        with pytest.raises(ConfigError, match=message):
            load_config(REPO / "config.yaml", overrides={"judge": {"model": "x"} | override})
    # The judge compares runs the workflow trains anyway.
    with pytest.raises(ConfigError, match=r"judge.pairs names dpo, which train.methods does not train"):
        load_config(REPO / "config.yaml", overrides={"judge": {"model": "x", "pairs": [["drpo", "dpo"]]}})
    with pytest.raises(ConfigError, match=r"judge.prompt_sets names 'partii', which is no evaluation prompt set"):
        load_config(REPO / "config.yaml", overrides={"judge": {"model": "x", "prompt_sets": ["partii"]}})


def test_the_asset_check_lists_a_missing_judge_folder(tmp_path):
    from drpo.assets import missing_assets
    from drpo.config import load_config

    config = load_config(REPO / "config.yaml", REPO / "configs" / "sdxl-turbo.yaml",
                         overrides={"prompts": {"train": "t.txt", "test": "t.txt"}})
    missing = {asset.path for asset in missing_assets(config)}
    folder = config["judge"]["model"]
    assert folder == "resources/models/Qwen3-VL-8B-Instruct"
    assert {f"{folder}/config.json", f"{folder}/model.safetensors", f"{folder}/preprocessor_config.json"} <= missing
    config["judge"]["model"] = None
    assert not any(path.startswith(folder) for path in {asset.path for asset in missing_assets(config)})


def test_a_qwen3_vl_folder_loads_and_answers_through_the_same_code(tmp_path):
    """The paper's judge is a Qwen3-VL: a random tiny one of that class (here, in the test) goes through the same
    loader (AutoModelForImageTextToText, the Qwen3-VL processor) and generation."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from drpo.miniature.judge import CHAT_TEMPLATE, build_judge_tokenizer, judge_words

    tokenizer = build_judge_tokenizer(judge_words(["a red circle"]))
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in
           ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                                "mrope_interleaved": True},
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"]}
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 32,
              "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
              "num_position_embeddings": 64, "deepstack_visual_indexes": [1]}
    config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    torch.manual_seed(0)
    Qwen3VLForConditionalGeneration(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    Qwen2VLImageProcessorPil(min_pixels=64 * 64, max_pixels=128 * 128, patch_size=16, merge_size=2,
                             temporal_patch_size=2).save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(CHAT_TEMPLATE)

    judge = Judge.load(tmp_path, device="cpu", dtype="float32", max_new_tokens=5)
    assert isinstance(judge.model, Qwen3VLForConditionalGeneration) and isinstance(judge.processor, Qwen3VLProcessor)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(4)]
    answers = judge.answer(["a red circle", "a blue square"], images[:2], images[2:])
    assert len(answers) == 2 and all(isinstance(answer, str) for answer in answers)
