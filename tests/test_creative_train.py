"""Creative4U presets end to end under fast_dev_run (small simulated world, small models), GRPO
from a saved SFT checkpoint, bad data folders, and a tiny randomly initialised transformers VLM
through the same trainers."""

import json
from pathlib import Path

import polars as pl
import pytest

from ctr.runs import compose_config

CONF = Path(__file__).resolve().parents[1] / "conf" / "creative"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


SMALL = ["data.sim.n_products=40", "data.image_size=64", "data.sim.image_size=64", "data.batch_size=8",
         "data.eval_batch_size=64", "policy.d_model=32", "policy.n_layers=1", "policy.n_heads=2",
         "grpo.group_size=2", "grpo.prompts_per_step=4", "pointwise.batch_size=32"]


def compose_run(overrides, run_dir: Path, cache_dir: Path):
    """A small world and small models; ``overrides`` come last and win."""
    return compose_config(CONF, [*SMALL, "logger=csv", "trainer.enable_progress_bar=false", *overrides],
                          run_dir=run_dir, cache_dir=cache_dir)


def test_every_preset_is_listed():
    assert EXPERIMENTS == ["creative_grpo", "creative_pointwise", "creative_sft_answer", "creative_sft_cot"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_fast_dev_run_every_preset(experiment, tmp_path, cache_dir):
    from ctr.creative.train import train

    cfg = compose_run([f"experiment={experiment}", "trainer.fast_dev_run=2"], tmp_path / "run", cache_dir)
    m = train(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["experiment"] == experiment and saved["stage"] == cfg.stage
    test = saved["test"]
    assert test["n_pairs"] == m["data"]["pairs_test"] > 0
    assert {"accuracy", "consistency", "accuracy_first_order", "accuracy_gap_0.6-1", "accuracy_gap_>2"} <= set(test)
    if experiment == "creative_pointwise":
        assert test["consistency"] == 1.0  # a pointwise score cannot depend on the order
    if experiment == "creative_grpo":
        assert [s["stage"] for s in saved["stages"]] == ["sft_cot", "grpo"]


def test_sft_checkpoint_then_grpo_logs_its_signals(tmp_path, cache_dir):
    from ctr.creative.train import train

    sft = compose_run(["experiment=creative_sft_cot", "sft.max_epochs=1", "data.limit_pairs=48"],
                      tmp_path / "sft", cache_dir)
    m = train(sft)
    assert Path(m["checkpoint"]).exists()
    grpo = compose_run(["experiment=creative_grpo", f"init_ckpt={m['checkpoint']}", "grpo.steps=4",
                        "grpo.val_every=2", "grpo.updates_per_batch=2", "data.limit_pairs=48",
                        "trainer.log_every_n_steps=1"], tmp_path / "grpo", cache_dir)
    g = train(grpo)
    assert g["stages"][0] == {"stage": "sft_cot", "checkpoint": m["checkpoint"]}
    assert g["stages"][1]["steps"] == 8  # 4 sampled batches x 2 updates
    head = (tmp_path / "grpo" / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for col in ("train/reward_step", "train/accuracy_step", "train/format_step", "train/kl_step",
                "train/clip_frac_step", "train/flat_groups_step", "val/acc"):
        assert col in head, col
    # a checkpoint from other data (another vocabulary) is refused
    other = compose_run(["experiment=creative_grpo", f"init_ckpt={m['checkpoint']}", "trainer.fast_dev_run=1",
                         "seed=5"], tmp_path / "other", cache_dir)
    with pytest.raises(ValueError, match="vocabulary"):
        train(other)


def test_a_data_folder_from_the_pairs_command_trains_and_bad_folders_are_named(tmp_path, cache_dir):
    from ctr.creative.pairs import main as pairs_main
    from ctr.creative.train import train
    from ctr.data.contract import ContractError

    out = pairs_main(["--out", str(tmp_path / "data"), "--n-products", "30", "--seed", "2"])
    cfg = compose_run(["experiment=creative_sft_answer", "trainer.fast_dev_run=1", f"data.dir={out}"],
                      tmp_path / "run", cache_dir)
    assert train(cfg)["data"]["source"] == str(out)
    pairs = pl.read_parquet(out / "pairs.parquet")
    pairs.with_columns(pl.when(pl.col("pair_id") == 3).then(pl.lit("C")).otherwise(pl.col("label"))
                       .alias("label")).write_parquet(out / "pairs.parquet")
    with pytest.raises(ContractError, match=r"pairs.parquet, column 'label', row 3"):
        train(cfg)
    pairs.drop("gap").write_parquet(out / "pairs.parquet")
    with pytest.raises(ContractError, match=r"column 'gap'.*missing column"):
        train(cfg)
    pairs.with_columns(pl.when(pl.col("pair_id") == 2).then(pl.lit("Test")).otherwise(pl.col("split"))
                       .alias("split")).write_parquet(out / "pairs.parquet")
    with pytest.raises(ContractError, match=r"column 'split', row 2"):
        train(cfg)
    pairs.write_parquet(out / "pairs.parquet")


def test_rationale_inputs_are_checked(tmp_path):
    from ctr.creative.data import load_tables, pair_texts
    from ctr.creative.pairs import main as pairs_main
    from ctr.data.contract import ContractError

    out = pairs_main(["--out", str(tmp_path / "data"), "--n-products", "12"])
    t = load_tables(str(out))
    assert pair_texts(t, t.pairs, cot=True)["target"][0].startswith("<think> intent : ")
    t.creatives = t.creatives.with_columns(pl.when(pl.col("creative_id") == 5).then(pl.lit("huge"))
                                           .otherwise(pl.col("text")).alias("text"))
    with pytest.raises(ContractError, match=r"creatives.parquet, column 'text', row 5.*unknown level"):
        pair_texts(t, t.pairs, cot=True)
    t = load_tables(str(out))
    t.contexts = t.contexts.with_columns(pl.lit(None, pl.Utf8).alias("intent"))
    with pytest.raises(ContractError, match=r"contexts.parquet, column 'intent', rows 0, 1.*null"):
        pair_texts(t, t.pairs, cot=True)
    creatives = pl.read_parquet(out / "creatives.parquet")
    pl.concat([creatives, creatives.head(1)]).write_parquet(out / "creatives.parquet")
    with pytest.raises(ContractError, match=r"column 'creative_id'.*duplicate id"):
        load_tables(str(out))


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    """A randomly initialised LLaVA (tiny CLIP vision tower + tiny Llama) with the MiniLM
    tokenizer, saved like a real local model folder."""
    import encoders  # noqa: F401
    from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from encoders.towers import minilm_model_dir

    path = tmp_path_factory.mktemp("tiny_llava")
    tok = AutoTokenizer.from_pretrained(str(minilm_model_dir()))
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                             crop_size={"height": 32, "width": 32}),
                          tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=32, patch_size=8),
        text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, vocab_size=len(tok), pad_token_id=tok.pad_token_id),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1)
    LlavaForConditionalGeneration(cfg).save_pretrained(path)
    proc.save_pretrained(path)
    return path


@pytest.mark.parametrize("experiment", ["creative_sft_cot", "creative_grpo"])
def test_a_transformers_vlm_trains_through_the_same_trainers(experiment, tiny_vlm, tmp_path, cache_dir):
    from ctr.creative.train import train

    cfg = compose_run([f"experiment={experiment}", "trainer.fast_dev_run=1", "policy.kind=hf",
                       f"policy.path={tiny_vlm}", "data.limit_pairs=6", "eval.max_new_tokens=160",
                       "grpo.max_new_tokens=160"], tmp_path / "run", cache_dir)
    m = train(cfg)
    assert m["policy"] == "hf" and m["test"]["n_pairs"] == 6
    assert m["parameters"] > 0


def test_a_generation_limit_shorter_than_the_targets_is_refused(tiny_vlm, tmp_path, cache_dir):
    from ctr.creative.train import train

    # a rationale is over 60 words, more subword tokens
    cfg = compose_run(["experiment=creative_sft_cot", "trainer.fast_dev_run=1", "policy.kind=hf",
                       f"policy.path={tiny_vlm}", "data.limit_pairs=6", "eval.max_new_tokens=40"],
                      tmp_path / "run", cache_dir)
    with pytest.raises(ValueError, match=r"eval.max_new_tokens=40 is shorter than the longest training target"):
        train(cfg)


def test_hf_policy_scores_its_own_samples(tiny_vlm, tmp_path, cache_dir):
    import torch

    from ctr.creative.data import CreativeDataModule
    from ctr.creative.hf import HFSelector

    dm = CreativeDataModule(sim={"n_products": 20, "image_size": 64}, image_size=64, tokens=False,
                            cache_dir=str(cache_dir), limit_pairs=4)
    dm.setup()
    pol = HFSelector(str(tiny_vlm))
    pol.bind(dm.images)
    batch = dm.dataset("test").collate([0, 1])
    pr = pol.repeat(pol.prompts(batch), 2)
    ids, mask = pol.generate(pr, max_new_tokens=6, temperature=1.0)
    lp = pol.token_logprobs(pr, ids, mask)
    assert lp.shape == ids.shape and torch.isfinite(lp).all() and (lp[~mask] == 0).all()
    # left-padded prompts of different lengths: scoring sees the positions generation used
    batch = dm.dataset("test").collate([0, 1])
    batch["prompt"][0] = "a longer query with more words . " + batch["prompt"][0]
    pr = pol.prompts(batch)
    inp = pol._inputs(pr)
    assert (inp["attention_mask"] == 0).any()  # some prompt is padded
    out = pol.model.generate(**inp, generation_config=pol.generation_config(5, greedy=True),
                             output_scores=True, return_dict_in_generate=True)
    gen = out.sequences[:, inp["input_ids"].shape[1]:]
    want = torch.stack([torch.log_softmax(sc.float(), -1).gather(-1, gen[:, t:t + 1]).squeeze(-1)
                        for t, sc in enumerate(out.scores)], 1)
    got = pol.token_logprobs(pr, gen, torch.ones_like(gen, dtype=torch.bool))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    ids, mask = pol.encode(["<think> a </think> <answer> A </answer>"])
    assert pol.decode(ids, mask)[0].replace(" ", "") == "<think>a</think><answer>a</answer>"
