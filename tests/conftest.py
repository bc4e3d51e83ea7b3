import os
from pathlib import Path

# Before anything imports wandb or torchvision.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")
_shared = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if "CTR_DATA_DIR" not in os.environ and _shared.exists():
    os.environ["CTR_DATA_DIR"] = str(_shared)

import ctr  # noqa: E402,F401  (installs the torchvision import hook)
import pytest  # noqa: E402

from ctr.data.prepare import PrepareSettings, SequenceSpec, prepare  # noqa: E402
from ctr.data.sources.simulator import SimulatorSource  # noqa: E402

SIM_SETTINGS = PrepareSettings(
    sparse=["user_id", "item_id", "category", "segment", "age_group", "query_item_id", "position"],
    sequence=SequenceSpec(max_len=20, clicked_only=True, side=["category"]),
    order=["timestamp", "request_id", "position"], keep=["true_ctr", "position"])


def data_dir() -> Path:
    d = os.environ.get("CTR_DATA_DIR")
    if not d or not Path(d).exists():
        pytest.skip("CTR_DATA_DIR is not set to the shared data folder")
    return Path(d)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prepared")


@pytest.fixture(scope="session")
def tiny_sim(cache_dir):
    return prepare(SimulatorSource("tiny", seed=0), SIM_SETTINGS, cache_dir)


@pytest.fixture(scope="session")
def ml100k(cache_dir):
    data_dir()
    from ctr.data.sources.movielens import PROTOCOL, MovieLens100K

    return prepare(MovieLens100K(), PROTOCOL, cache_dir)
