"""DeepCTR-Torch's DIN on ML100K-CTR v1: the peer side of ``experiments/bench_peers.py``.

Runs in its own virtual environment (``.venv-peers``: deepctr-torch 0.3.0 over the same torch),
imports nothing from this project, and writes ``result.json`` plus the test predictions
(``test_pred.npy``) and the prepared arrays the orchestrator checks against this project's split
(``split_check.npz``):

    .venv-peers/bin/python experiments/peers/deepctr_din.py --data $CTR_DATA_DIR/movielens_100k \
        --seed 0 --out DIR

Preprocessing is what a DeepCTR-Torch user writes for this protocol (the library has no sequence
preprocessing of its own): pandas, codes fitted on the train period (0 padding, 1 unseen),
each user's strictly earlier items collected in a Python loop and padded to 50, most recent
first. Training is ``model.fit`` one epoch at a time (timed alone), validation AUC after each
epoch, early stopping with patience 2, the best epoch's weights kept for the test.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import resource
import time
from pathlib import Path

import numpy as np

SPARSE = ["user_id", "item_id", "genre", "age", "gender", "occupation"]
MAX_LEN = 50


def block_version_ping() -> None:
    """deepctr_torch's ``__init__`` starts a thread that GETs pypi.python.org; there is no network
    here (and a benchmark should not wait on one): answer it with a non-200 response."""
    import requests

    class _NoNetwork:
        status_code = 599
        text = "{}"

    requests.get = lambda *a, **k: _NoNetwork()  # type: ignore[assignment]


def read_atomic(path: Path):
    import pandas as pd

    df = pd.read_csv(path, sep="\t", dtype=str, quoting=3)
    return df.rename(columns={c: c.split(":")[0] for c in df.columns})


def preprocess(root: Path) -> dict:
    """Raw RecBole files -> per split: feature arrays, label, user, history (ML100K-CTR v1)."""
    import pandas as pd

    inter = read_atomic(root / "ml-100k.inter")
    items = read_atomic(root / "ml-100k.item")
    users = read_atomic(root / "ml-100k.user")
    df = pd.DataFrame({
        "user_id": inter["user_id"].astype(np.int64), "item_id": inter["item_id"].astype(np.int64),
        "timestamp": inter["timestamp"].astype(np.float64),
        "label": (inter["rating"].astype(np.float64) >= 4.0).astype(np.float32)})
    items = pd.DataFrame({"item_id": items["item_id"].astype(np.int64),
                          "genre": items["class"].str.split(" ").str[0]})
    users = users.assign(user_id=users["user_id"].astype(np.int64))[["user_id", "age", "gender", "occupation"]]
    df = df.merge(items, on="item_id", how="left").merge(users, on="user_id", how="left")
    df = df.sort_values(["timestamp", "user_id", "item_id"], kind="stable").reset_index(drop=True)
    n = len(df)
    n_train, n_val = int(n * 0.8), int(n * 0.9)
    df["split"] = np.where(np.arange(n) < n_train, "train", np.where(np.arange(n) < n_val, "val", "test"))

    vocab = {}
    for c in SPARSE:  # codes fitted on the train period; 0 padding, 1 unseen
        keys = sorted(df.loc[df["split"] == "train", c].dropna().unique().tolist(), key=str)
        vocab[c] = {k: i + 2 for i, k in enumerate(keys)}
        df[c + "_code"] = df[c].map(vocab[c]).fillna(1).astype(np.int64)

    # each user's strictly earlier items (all ratings), the last 50, most recent first
    hist_item = np.zeros((n, MAX_LEN), dtype=np.int64)
    hist_genre = np.zeros((n, MAX_LEN), dtype=np.int64)
    hist_len = np.zeros(n, dtype=np.int64)
    for _, g in df.groupby("user_id", sort=False):
        rows, ts = g.index.to_numpy(), g["timestamp"].to_numpy()
        it, ge = g["item_id_code"].tolist(), g["genre_code"].tolist()
        seen_i: list[int] = []
        seen_g: list[int] = []
        j = 0
        for k, r in enumerate(rows):
            while j < k and ts[j] < ts[k]:  # events at the same time never see each other
                seen_i.append(it[j])
                seen_g.append(ge[j])
                j += 1
            h_i, h_g = seen_i[-MAX_LEN:][::-1], seen_g[-MAX_LEN:][::-1]
            hist_item[r, :len(h_i)] = h_i
            hist_genre[r, :len(h_g)] = h_g
            hist_len[r] = len(h_i)
    out = {}
    for split in ("train", "val", "test"):
        m = (df["split"] == split).to_numpy()
        x = {c: df.loc[m, c + "_code"].to_numpy() for c in SPARSE}
        x["hist_item_id"], x["hist_genre"], x["seq_length"] = hist_item[m], hist_genre[m], hist_len[m]
        out[split] = {"x": x, "y": df.loc[m, "label"].to_numpy(), "user": df.loc[m, "user_id"].to_numpy(),
                      "item_raw": df.loc[m, "item_id"].to_numpy()}
    out["vocab_sizes"] = {c: len(v) + 2 for c, v in vocab.items()}
    out["item_of_code"] = np.array([0, 0] + list(vocab["item_id"]), dtype=np.int64)  # code -> raw item_id
    return out


def split_check(data: dict) -> dict[str, np.ndarray]:
    """What the orchestrator compares with this project's split: every split's labels, and the
    test split's history lengths, histories and targets as raw item ids, and its users."""
    te = data["test"]
    return {**{f"{s}_label": data[s]["y"] for s in ("train", "val", "test")},
            "test_hist_len": te["x"]["seq_length"], "test_hist_item": data["item_of_code"][te["x"]["hist_item_id"]],
            "test_item": te["item_raw"], "test_user": te["user"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="the movielens_100k folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-epochs", type=int, default=20)
    ap.add_argument("--patience", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import pandas  # noqa: F401  (imported before the clock starts, as this project's polars is)

    t0 = time.perf_counter()
    data = preprocess(args.data)
    prep_s = time.perf_counter() - t0
    te = data["test"]
    np.savez(args.out / "split_check.npz", **split_check(data))

    block_version_ping()
    import torch
    from sklearn.metrics import roc_auc_score

    if args.threads:
        torch.set_num_threads(args.threads)
    from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat
    from deepctr_torch.models import DIN

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    vs = data["vocab_sizes"]
    columns = [SparseFeat(c, vs[c], embedding_dim=32) for c in SPARSE]
    columns += [VarLenSparseFeat(SparseFeat("hist_item_id", vs["item_id"], embedding_dim=32, embedding_name="item_id"),
                                 maxlen=MAX_LEN, length_name="seq_length"),
                VarLenSparseFeat(SparseFeat("hist_genre", vs["genre"], embedding_dim=32, embedding_name="genre"),
                                 maxlen=MAX_LEN, length_name="seq_length")]
    model = DIN(columns, ["item_id", "genre"], att_hidden_size=(64, 32), dnn_hidden_units=(200, 80),
                device="cpu", seed=args.seed)
    model.compile("adam", "binary_crossentropy", metrics=[])  # Adam at its 1e-3 default

    tr, va = data["train"], data["val"]
    train_s, samples, best, best_auc, bad, epochs = 0.0, 0, None, -1.0, 0, 0
    for epoch in range(args.max_epochs):
        t = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # fit prints the device and sizes
            model.fit(tr["x"], tr["y"], batch_size=1024, epochs=1, verbose=0, shuffle=True)
        train_s += time.perf_counter() - t
        samples += len(tr["y"])
        epochs += 1
        auc = roc_auc_score(va["y"], model.predict(va["x"], 2048).ravel())
        if auc > best_auc:
            best_auc, best, bad = auc, copy.deepcopy(model.state_dict()), 0
        else:
            bad += 1
            if bad >= args.patience:
                break
    model.load_state_dict(best)
    pred = model.predict(te["x"], 2048).ravel().astype(np.float32)
    np.save(args.out / "test_pred.npy", pred)
    result = {"system": "deepctr-torch", "seed": args.seed, "prepare_seconds": prep_s,
              "train_seconds": train_s, "train_samples": samples, "train_samples_per_s": samples / train_s,
              "epochs": epochs, "best_val_auc": best_auc, "torch_threads": torch.get_num_threads(),
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    (args.out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
