"""Safe loading and determinism: checkpoints are written atomically and never unpickle code on
load; config never reaches eval; the same seed and config give the same metrics twice."""

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ctr.resume import AtomicCheckpointIO, UnsafeCheckpointError, atomic_save, safe_load

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("ctr", "encoders", "experiments") for p in (ROOT / d).rglob("*.py"))


class _Payload:
    """Unpickling this runs code: it creates the file named by ``flag``."""

    def __init__(self, flag: str):
        self.flag = flag

    def __reduce__(self):
        return (Path.touch, (Path(self.flag),))


def _evil_checkpoint(path: Path, flag: Path) -> None:
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 1, "evil": _Payload(str(flag))}, path)


def test_safe_load_refuses_a_checkpoint_that_would_run_code(tmp_path):
    ckpt, flag = tmp_path / "evil.ckpt", tmp_path / "pwned"
    _evil_checkpoint(ckpt, flag)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        safe_load(ckpt)
    with pytest.raises(UnsafeCheckpointError):
        AtomicCheckpointIO().load_checkpoint(ckpt)  # the path Lightning takes to resume
    assert not flag.exists()
    torch.load(ckpt, weights_only=False)  # the same file, unpickled: the payload would have run
    assert flag.exists()


def test_resume_and_init_from_refuse_a_planted_checkpoint(tmp_path, cache_dir):
    """A last.ckpt planted in a run folder (resume) and an encoder init_from checkpoint."""
    from ctr.runs import compose_config
    from ctr.train import train
    from encoders.train import load_init

    flag = tmp_path / "pwned"
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    _evil_checkpoint(run / "checkpoints" / "last.ckpt", flag)
    cfg = compose_config(ROOT / "conf", ["experiment=sim_din", "data.source.preset=tiny", "logger=none",
                                         "trainer.max_epochs=1", "trainer.enable_progress_bar=false"],
                         run_dir=run, cache_dir=cache_dir, embeddings_dir=tmp_path / "emb")
    with pytest.raises(UnsafeCheckpointError):
        train(cfg)
    with pytest.raises(UnsafeCheckpointError):
        load_init(torch.nn.Linear(2, 2), run / "checkpoints" / "last.ckpt")
    assert not flag.exists()


def test_no_eval_exec_or_unsafe_load_in_the_sources():
    """Config never reaches eval/exec; nothing unpickles files (pickle, torch.load without
    weights_only=True): every load goes through safe_load or safetensors."""
    bad = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if isinstance(f, ast.Name) and name in ("eval", "exec"):
                bad.append(f"{where} {name}()")
            if owner in ("pickle", "dill", "joblib", "cloudpickle") and name in ("load", "loads"):
                bad.append(f"{where} {owner}.{name}()")
            if owner == "torch" and name == "load":
                wo = {k.arg: k.value for k in node.keywords}.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    bad.append(f"{where} torch.load without weights_only=True")
    assert not bad, bad


_WRITER = """
import sys, itertools, torch
from ctr.resume import atomic_save
for i in itertools.count():
    atomic_save({"i": i, "w": torch.full((1 << 21,), float(i))}, sys.argv[1])
"""


def test_sigkilled_checkpoint_writes_never_leave_a_broken_file(tmp_path):
    """A process rewriting an 8 MB checkpoint in a loop is SIGKILLed at arbitrary moments: the file
    always loads and is one whole version."""
    path = tmp_path / "last.ckpt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for delay in (0.05, 0.13, 0.31):
        p = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], env=env)
        t0 = time.monotonic()
        while not path.exists() and time.monotonic() - t0 < 60:
            time.sleep(0.01)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        state = safe_load(path)
        assert torch.equal(state["w"], torch.full((1 << 21,), float(state["i"])))


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_save({"v": torch.ones(3)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({"v": torch.zeros(3), "x": Unpicklable()}, path)
    assert torch.equal(safe_load(path)["v"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left behind


def test_same_seed_and_config_give_the_same_metrics_twice(tmp_path, cache_dir):
    from ctr.runs import compose_config
    from ctr.train import train

    def run(name: str) -> dict:
        cfg = compose_config(ROOT / "conf", ["experiment=sim_din", "data.source.preset=tiny", "logger=none",
                                             "trainer.max_epochs=2", "trainer.enable_progress_bar=false"],
                             run_dir=tmp_path / name, cache_dir=cache_dir, embeddings_dir=tmp_path / "emb")
        m = json.loads(json.dumps(train(cfg)))
        return {k: v for k, v in m.items() if k != "checkpoint" and not k.endswith(("seconds", "per_s"))}

    a, b = run("a"), run("b")
    assert a == b and a["epochs"] == 2 and a["train_samples"] > 0
