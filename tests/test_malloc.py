"""The allocator tuning of the training entry points (ctr/malloc.py): applied once per process on
glibc, the user's own MALLOC_* variables and CTR_MALLOC_TUNING=0 respected."""

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc only")
CODE = "import json; from ctr.malloc import tune_malloc; a = tune_malloc(); assert tune_malloc() is a; print(json.dumps(a))"


def _run(**env) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "CTR_MALLOC_TUNING"}
    out = subprocess.run([sys.executable, "-c", CODE], env={**base, **env}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_tuning_applies_keeps_user_settings_and_can_be_switched_off():
    assert _run() == {"malloc_mmap_threshold": 32 * 2**20, "malloc_trim_threshold": 2**31 - 1,
                      "malloc_top_pad": 512 * 2**20}
    assert set(_run(MALLOC_TRIM_THRESHOLD_="1000000")) == {"malloc_mmap_threshold", "malloc_top_pad"}
    assert _run(CTR_MALLOC_TUNING="0") == {}


START = """import json
from omegaconf import OmegaConf
from ctr.malloc import applied
from ctr.runs import environment, start_run
assert applied() is None and environment()["malloc_tuning"] is None
start_run(OmegaConf.create({"paths": {"run_dir": %r}, "seed": 0, "threads": None}))
print(json.dumps([applied(), environment()["malloc_tuning"]]))
"""


def test_training_entry_points_apply_and_record_it(tmp_path):
    """start_run (every training entry point's first step) applies the tuning; env.json records it."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "CTR_MALLOC_TUNING"}
    out = subprocess.run([sys.executable, "-c", START % str(tmp_path / "run")], env=base, capture_output=True,
                         text=True, check=True)
    done, recorded = json.loads(out.stdout.strip().splitlines()[-1])
    assert done == recorded == _run()
