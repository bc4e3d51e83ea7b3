"""The three-stage pipeline end to end on the tiny simulator: stages run, chain, reuse and resume."""

import json

import pytest

from ctr import pipeline

FAST_ENC = ["data.module.source.preset=tiny", "trainer.max_epochs=1", "data.module.steps_per_epoch=2",
            "image_size=32"]
FAST_CTR = ["data.source.preset=tiny", "trainer.max_epochs=1", "trainer.limit_train_batches=3"]


@pytest.mark.slow
def test_pipeline_chains_reuses_and_resumes(tmp_path, cache_dir, capsys, monkeypatch):
    args = ["--out", str(tmp_path / "out"), "--logger", "csv", "--encoders", *FAST_ENC, "--ctr", *FAST_CTR]
    monkeypatch.setenv("CTR_EMBED_DIR", str(tmp_path / "emb"))
    monkeypatch.setenv("CTR_CACHE_DIR", str(cache_dir))
    r = pipeline.main(args)[0]
    enc = r["encoders"]
    # post-training started from the pretrain run, and each CTR variant read its stage's table
    post = json.loads((tmp_path / "out" / enc["posttrain"]["run_dir"].split("/")[-1] / "metrics.json").read_text())
    assert post["init_from"]["checkpoint"].startswith(enc["pretrain"]["run_dir"])
    by = {v.label: m for v, m in r["ctr"]}
    assert by["ID-only DIN"]["visual"] is None
    assert by["+ pretrained embeddings"]["visual"]["fingerprint"] == enc["pretrain"]["table"]
    assert by["+ post-trained embeddings"]["visual"]["fingerprint"] == enc["posttrain"]["table"]
    assert by["+ debiasing network"]["visual"]["debias"] is True
    table = (tmp_path / "out" / "pipeline.md").read_text()
    assert "true_ctr oracle" in table and "+ debiasing network" in table
    # a second call reuses every stage; a CTR stage that lost its metrics resumes from last.ckpt
    ids_dir = next((tmp_path / "out").glob("ctr-sim_din-ids-seed0-*"))
    (ids_dir / "metrics.json").unlink()
    assert (ids_dir / "checkpoints" / "last.ckpt").exists()
    capsys.readouterr()
    pipeline.main(args)
    err = capsys.readouterr().err
    assert err.count("reused") == 5 and "[ctr-sim_din-ids-seed0] resuming" in err
    assert (ids_dir / "metrics.json").exists()
    # a post-training recipe of its own: the pretrain stage is reused, post-training reruns with it
    r2 = pipeline.main([*args, "--posttrain", "data.module.n_shown=1"])[0]
    err = capsys.readouterr().err
    assert "[pretrain-seed0] reused" in err and "[posttrain-seed0] running" in err
    assert r2["encoders"]["pretrain"]["run_dir"] == enc["pretrain"]["run_dir"]
    post2 = json.loads((tmp_path / "out" / r2["encoders"]["posttrain"]["run_dir"].split("/")[-1]
                        / "metrics.json").read_text())
    assert post2["init_from"]["checkpoint"].startswith(enc["pretrain"]["run_dir"])
    assert "n_shown: 1" in (tmp_path / "out" / r2["encoders"]["posttrain"]["run_dir"].split("/")[-1]
                            / "config.yaml").read_text()


def test_pipeline_budget_comes_first_and_yields_to_overrides(monkeypatch, tmp_path):
    """`make run`'s two epochs per stage go ahead of the caller's overrides, so that an override of
    the same key wins (Hydra keeps the last value)."""
    from ctr.runs import compose_config

    seen = {}

    class Stop(Exception):
        pass

    def capture(out, cache, emb, encoder_overrides, ctr_overrides, *a, **k):
        seen.update(enc=encoder_overrides, ctr=ctr_overrides)
        raise Stop

    monkeypatch.setattr(pipeline, "Pipeline", capture)
    with pytest.raises(Stop):
        pipeline.main(["--out", str(tmp_path), "--encoders", "trainer.max_epochs=4"])
    assert seen == {"enc": ["trainer.max_epochs=2", "trainer.max_epochs=4"], "ctr": ["trainer.max_epochs=2"]}
    cfg = compose_config(pipeline.CONF, ["experiment=sim_din", *seen["enc"]], run_dir=tmp_path, cache_dir=tmp_path,
                         embeddings_dir=tmp_path)
    assert cfg.trainer.max_epochs == 4
