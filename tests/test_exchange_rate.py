"""The exchange-rate fit against numpy's least squares and the known t quantiles."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

spec = importlib.util.spec_from_file_location(
    "exchange_rate", Path(__file__).resolve().parents[1] / "experiments" / "exchange_rate.py")
er = importlib.util.module_from_spec(spec)
spec.loader.exec_module(er)


def test_slope_ci_matches_least_squares():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.1, 0.2, 8)
    y = 0.6 + 0.5 * x + rng.normal(0, 0.002, 8)
    f = er.fit_slope(list(x), list(y))
    b, a = np.polyfit(x, y, 1)
    assert np.isclose(f["slope"], b) and np.isclose(f["intercept"], a)
    resid = y - (a + b * x)
    se = np.sqrt((resid ** 2).sum() / 6 / ((x - x.mean()) ** 2).sum())
    assert np.isclose(f["se"], se)
    assert np.allclose(f["ci"], (b - 2.447 * se, b + 2.447 * se))  # t_{0.975, 6} = 2.447
    assert f["ci"][0] < 0.5 < f["ci"][1] and f["r"] > 0.9


def test_degenerate_inputs_give_nan():
    assert np.isnan(er.fit_slope([0.1, 0.2], [0.5, 0.6])["slope"])  # two points: no interval
    assert np.isnan(er.fit_slope([0.1, 0.1, 0.1], [0.5, 0.6, 0.7])["slope"])  # no spread in x


@pytest.mark.slow
def test_exchange_rate_end_to_end_on_the_tiny_simulator(tmp_path, cache_dir, monkeypatch):
    """Encoder variants along training (exported per epoch), their recall and probes, a CTR run
    on each, the fits, the table and the plot."""
    monkeypatch.setenv("CTR_EMBED_DIR", str(tmp_path / "emb"))
    monkeypatch.setenv("CTR_CACHE_DIR", str(cache_dir))
    out = tmp_path / "er"
    res = er.main(["--out", str(out), "--sim-preset", "tiny", "--encoders", "trainer.max_epochs=2",
                   "data.module.steps_per_epoch=2", "image_size=32", "--", "trainer.max_epochs=1",
                   "trainer.limit_train_batches=2"])
    rows = res["rows"]
    # the ImageNet encoder, pretraining's and post-training's epochs (the post-training's start = the
    # pretraining's end: one table)
    assert len(rows) >= 3 and rows[0]["origin"].endswith("epoch -1")
    assert all(0 <= r["recall@10"] <= 1 and 0 <= r["category probe"] <= 1 for r in rows)
    assert len({r["fingerprint"] for r in rows}) == len(rows)
    assert set(res["fits"]) == {"recall@10", "category probe", "colour probe"}
    assert (out / "exchange_rate.md").read_text().count("|") > 20
    assert (out / "exchange_rate.png").stat().st_size > 10_000


def test_a_variant_that_fails_is_a_missing_point(tmp_path, cache_dir, monkeypatch):
    """Two readable tables and one that does not exist: the two are measured (a CTR run each), the
    third is listed as missing in the table, and the script's exit status says so."""
    from conftest import attribute_vectors
    from ctr.data.sources.simulator import SimulatorSource, simulate
    from encoders.export import write_table

    emb = tmp_path / "emb"
    monkeypatch.setenv("CTR_EMBED_DIR", str(emb))
    monkeypatch.setenv("CTR_CACHE_DIR", str(cache_dir))
    truth = simulate(SimulatorSource("tiny", seed=0).config()).item_truth
    for k in (1, 2):
        write_table(truth["item_id"].to_numpy(), attribute_vectors(truth, seed=k), emb, f"good{k}")
    out = tmp_path / "er"
    res = er.main(["--out", str(out), "--sim-preset", "tiny", "--tables", "good1", "nosuchtable", "good2",
                   "--", "trainer.max_epochs=1", "trainer.limit_train_batches=1", "logger=none"])
    assert [r["fingerprint"] for r in res["rows"]] == ["good1", "good2"]
    assert [m["fingerprint"] for m in res["missing"]] == ["nosuchtable"]
    assert "FileNotFoundError" in res["missing"][0]["errors"][0]
    md = (out / "exchange_rate.md").read_text()
    assert "Missing points (1 of 3 variants" in md and "nosuchtable" in md
