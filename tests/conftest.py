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
    order=["timestamp", "request_id", "position"], keep=["true_ctr", "position"],
    item_refs=["item_id", "query_item_id"])


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


def attribute_vectors(item_truth, dim: int = 16, seed: int = 0):
    """Item vectors that encode the simulator's true attributes (one-hots of category, colour,
    pattern and shade through a fixed random map, plus a little noise): a stand-in for a trained
    image encoder in the CTR model's tests."""
    import numpy as np

    rng = np.random.default_rng(seed)
    cols = ["category_idx", "colour_idx", "pattern_idx", "shade_idx"]
    onehots = [np.eye(int(item_truth[c].max()) + 1)[item_truth[c].to_numpy()] for c in cols]
    x = np.concatenate(onehots, axis=1)
    v = x @ rng.normal(size=(x.shape[1], dim)) + 0.1 * rng.normal(size=(len(x), dim))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="session")
def sim_table(tmp_path_factory):
    """An exported-format embedding table for the tiny simulator: (directory, fingerprint)."""
    from ctr.data.sources.simulator import SimulatorSource, simulate
    from encoders.export import write_table

    src = SimulatorSource("tiny", seed=0)
    d = simulate(src.config())
    out = tmp_path_factory.mktemp("embeddings")
    write_table(d.item_truth["item_id"].to_numpy(), attribute_vectors(d.item_truth), out, "attrs0000tiny000",
                {"items": {**src.describe(), "click_split": None}})
    return out, "attrs0000tiny000"
