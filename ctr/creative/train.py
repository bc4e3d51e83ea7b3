"""Train and evaluate a creative selector (Creative4U): ``python -m ctr.creative.train experiment=...``.

Presets (``conf/creative/experiment/``):

* ``creative_pointwise``: a CTR regressor on image embeddings, picks the higher-scored creative;
* ``creative_sft_answer``: SFT without reasoning (answer only);
* ``creative_sft_cot``: CoT-SFT on the aspect-by-aspect rationales;
* ``creative_grpo``: GRPO from a CoT-SFT checkpoint (``init_ckpt=<run>/checkpoints/best.ckpt``;
  without it the CoT-SFT stage runs first, in ``<run>/sft/``).

Every stage keeps its best checkpoint on ``val/acc`` (greedy selection accuracy on the validation
pairs) and the run folder gets ``metrics.json`` with the test pairs' selection accuracy (both
orders), order-swap consistency and accuracy by CTR-gap bucket (:mod:`ctr.creative.evaluate`).
``policy.kind=hf policy.path=<local model>`` trains a transformers vision-language model instead of
the small decoder, with the same data, prompts, rewards and trainers.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import encoders  # noqa: F401  (installs the torchvision import hook before lightning is imported)

warnings.filterwarnings("ignore", message=r"Found .* module\(s\) in eval mode")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from ctr.resume import safe_load
from ctr.runs import best_checkpoint, best_epoch, build_trainer, failure_recorded, finish_run, start_run

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf" / "creative")


def build_datamodule(cfg: DictConfig, cot: bool, tokens: bool):
    from hydra.utils import instantiate

    from ctr.creative.data import CreativeDataModule

    tower = instantiate(cfg.image_tower, _convert_="all") if tokens else None
    return CreativeDataModule(**OmegaConf.to_container(cfg.data, resolve=True), cot=cot, tokens=tokens,
                              image_tower=tower, cache_dir=cfg.paths.cache_dir)


def vocabulary(dm):
    """The small models' word vocabulary: the training pairs' prompts and targets (CoT rationales
    where the data has them) and the answer tags, so that every stage of one data set shares it."""
    import polars as pl

    from ctr.creative.data import pair_texts
    from ctr.creative.prompts import answer_only
    from ctr.creative.selector import WordVocab

    train = dm.splits["train"]
    texts = train["prompt"].to_list() + [answer_only("A"), answer_only("B"), "<think> </think>"]
    if dm.cot:  # the data module holds the rationales already
        return WordVocab.from_texts(texts + train["target"].to_list())
    try:
        texts += pair_texts(dm.tables, dm.tables.pairs.filter(pl.col("split") == "train"), cot=True)["target"].to_list()
    except ValueError:  # no attributes for rationales (a real log): answer-only vocabulary
        pass
    return WordVocab.from_texts(texts)


def policy_class(kind: str):
    """The Policy class of ``policy.kind`` (``small`` or ``hf``)."""
    if kind == "small":
        from ctr.creative.selector import SmallSelector
        return SmallSelector
    if kind == "hf":
        from ctr.creative.hf import HFSelector
        return HFSelector
    raise ValueError(f"policy.kind must be small or hf, got {kind!r}")


def build_policy(cfg: DictConfig, dm):
    p = cfg.policy
    cls = policy_class(p.kind)
    if p.kind == "hf":
        if not p.path:
            raise ValueError("policy.kind=hf needs policy.path (a local transformers model folder)")
        policy = cls(p.path, dtype=p.dtype)
    else:
        tok = dm.images.tokens
        policy = cls(vocabulary(dm), image_dim=int(tok.shape[-1]), image_tokens=int(tok.shape[1]),
                     d_model=p.d_model, n_layers=p.n_layers, n_heads=p.n_heads, dropout=p.dropout,
                     max_prompt=p.max_prompt, max_completion=p.max_completion, image_grid=p.image_grid)
    policy.bind(dm.images)
    return policy


def check_completion_budget(cfg: DictConfig, policy, dm) -> int:
    """The longest training target in the policy's tokens; an error when a generation limit
    (``eval.max_new_tokens``, and ``grpo.max_new_tokens`` for GRPO) is shorter, since a cut
    completion has no answer and would count as a wrong selection."""
    targets = dm.splits["train"]["target"].to_list()
    longest = 0
    for lo in range(0, len(targets), 512):
        _, mask = policy.encode(targets[lo:lo + 512])
        longest = max(longest, int(mask.sum(1).max()))
    limits = {"eval.max_new_tokens": cfg.eval.max_new_tokens}
    if cfg.stage == "grpo":
        limits["grpo.max_new_tokens"] = cfg.grpo.max_new_tokens
    for name, limit in limits.items():
        if limit < longest:
            raise ValueError(f"{name}={limit} is shorter than the longest training target ({longest} tokens "
                             f"with this policy's tokenizer): raise it to at least {longest}")
    return longest


def _stage_cfg(cfg: DictConfig, run_dir: Path, **trainer) -> DictConfig:
    c = cfg.copy()
    with open_dict(c):
        c.paths.run_dir = str(run_dir)
        for k, v in trainer.items():
            c.trainer[k] = v
    return c


def _fit(cfg: DictConfig, run_dir: Path, module, trainer_overrides: dict, **fit_kwargs):
    """Fit ``module`` with the stage's trainer settings, reload its best checkpoint (on val/acc).
    Returns ``(best checkpoint, checkpoint callback, trainer, fit seconds)``."""
    c = _stage_cfg(cfg, run_dir, **trainer_overrides)
    trainer, ckpt, loggers = build_trainer(c, run_dir)
    t0 = time.perf_counter()
    trainer.fit(module, **fit_kwargs)
    seconds = time.perf_counter() - t0
    best = best_checkpoint(c, ckpt)
    if best:
        module.load_state_dict(safe_load(best)["state_dict"])
    for lg in loggers:
        lg.finalize("success")
    return best, ckpt, trainer, seconds


def fit_sft(cfg: DictConfig, dm, policy, run_dir: Path, target: str) -> tuple[object, str | None, dict]:
    from ctr.creative.module import SFTModule

    s = cfg.sft
    module = SFTModule(policy, lr=s.lr, weight_decay=s.weight_decay, warmup_steps=s.warmup_steps,
                       max_new_tokens=cfg.eval.max_new_tokens, nonfinite=s.get("nonfinite", "fail"))
    best, ckpt, trainer, seconds = _fit(cfg, run_dir, module, {"max_epochs": s.max_epochs}, datamodule=dm)
    return module, best, {"stage": f"sft_{target}", "fit_seconds": seconds,
                          "best_epoch": best_epoch(ckpt), "epochs": trainer.current_epoch, "checkpoint": best}


def fit_grpo(cfg: DictConfig, dm, policy, run_dir: Path) -> tuple[object, str | None, dict]:
    from ctr.creative.module import GRPOModule

    g = cfg.grpo
    module = GRPOModule(policy, group_size=g.group_size, temperature=g.temperature,
                        max_new_tokens=g.max_new_tokens, clip_eps=g.clip_eps, kl_beta=g.kl_beta,
                        updates_per_batch=g.updates_per_batch, reward_format=g.reward_format,
                        reward_accuracy=g.reward_accuracy, loss_agg=g.loss_agg, lr=g.lr,
                        weight_decay=g.weight_decay, warmup_steps=g.warmup_steps, max_grad_norm=g.max_grad_norm,
                        nonfinite=g.get("nonfinite", "fail"))
    dm.batch_size = g.prompts_per_step
    best, _, trainer, seconds = _fit(
        cfg, run_dir, module, {"max_epochs": -1, "max_steps": int(g.steps) * int(g.updates_per_batch),
                               "val_check_interval": int(g.val_every), "check_val_every_n_epoch": None},
        datamodule=dm)
    return module, best, {"stage": "grpo", "fit_seconds": seconds, "best_step": _best_step(best),
                          "steps": trainer.global_step, "checkpoint": best}


def _best_step(best: str | None) -> int | None:
    if not best:
        return None
    return int(safe_load(best).get("global_step", -1))


def fit_pointwise(cfg: DictConfig, dm, run_dir: Path) -> tuple[object, str | None, dict]:
    from ctr.creative.pointwise import PointwiseCTR, PointwiseModule, cell_loader

    p = cfg.pointwise
    tok = dm.images.tokens
    model = PointwiseCTR(vocabulary(dm), int(tok.shape[-1]), hidden=p.hidden, dropout=p.dropout)
    model.bind(dm.images)
    module = PointwiseModule(model, lr=p.lr, weight_decay=p.weight_decay, warmup_steps=p.warmup_steps,
                             nonfinite=p.get("nonfinite", "fail"))
    best, ckpt, trainer, seconds = _fit(cfg, run_dir, module, {"max_epochs": p.max_epochs},
                                        train_dataloaders=cell_loader(dm.cells("train"), p.batch_size, True),
                                        val_dataloaders=dm.val_dataloader())
    return module, best, {"stage": "pointwise", "fit_seconds": seconds,
                          "best_epoch": best_epoch(ckpt), "epochs": trainer.current_epoch, "checkpoint": best}


def evaluate(cfg: DictConfig, dm, model, split: str = "test") -> dict:
    """Selection metrics of the pointwise baseline (a PointwiseModule) or of a generative policy."""
    from ctr.creative.evaluate import evaluate_policy, selection_metrics
    from ctr.creative.pointwise import PointwiseModule, pointwise_choices

    if isinstance(model, PointwiseModule):
        ds, sw = dm.dataset(split), dm.dataset(split, swapped=True)
        first = pointwise_choices(model, ds)
        first_sw = 1 - pointwise_choices(model, sw)
        return selection_metrics(first, first_sw, (ds.label == 0).numpy(), ds.gap.numpy())
    return evaluate_policy(model, dm, split, cfg.eval.batch_size, cfg.eval.max_new_tokens)


def train(cfg: DictConfig) -> dict:
    t_start = time.perf_counter()
    run_dir = start_run(cfg)
    stage = cfg.stage
    if stage not in ("pointwise", "sft", "grpo"):
        raise ValueError(f"stage must be pointwise, sft or grpo, got {stage!r}")
    cot = stage == "grpo" or (stage == "sft" and cfg.sft.target == "cot")
    if stage == "sft" and cfg.sft.target not in ("cot", "answer"):
        raise ValueError(f"sft.target must be cot or answer, got {cfg.sft.target!r}")
    dm = build_datamodule(cfg, cot=cot, tokens=stage == "pointwise" or policy_class(cfg.policy.kind).needs == "tokens")
    t0 = time.perf_counter()
    dm.setup()
    data_s = time.perf_counter() - t0
    stages = []
    if stage == "pointwise":
        module, best, info = fit_pointwise(cfg, dm, run_dir)
        stages.append(info)
    else:
        policy = build_policy(cfg, dm)
        check_completion_budget(cfg, policy, dm)
        if stage == "sft":
            module, best, info = fit_sft(cfg, dm, policy, run_dir, cfg.sft.target)
            stages.append(info)
        else:
            if cfg.init_ckpt:
                state = safe_load(cfg.init_ckpt)
                _check_vocab(state, policy, cfg.init_ckpt)
                policy.load_state_dict({k[len("policy."):]: v for k, v in state["state_dict"].items()
                                        if k.startswith("policy.")})
                stages.append({"stage": "sft_cot", "checkpoint": cfg.init_ckpt})
            else:
                _, _, info = fit_sft(cfg, dm, policy, run_dir / "sft", "cot")
                stages.append(info)
            sft_val = evaluate(cfg, dm, policy, "val") if not cfg.trainer.get("fast_dev_run") else {}
            module, best, info = fit_grpo(cfg, dm, policy, run_dir)
            info["sft_val_accuracy"] = sft_val.get("accuracy_first_order")
            stages.append(info)
    model = module if stage == "pointwise" else module.policy
    test = evaluate(cfg, dm, model, "test")
    val = evaluate(cfg, dm, model, "val") if dm.splits["val"].height else {}
    t = dm.tables
    metrics = {
        "experiment": cfg.get("name"), "seed": cfg.seed, "stage": stage,
        "axes": OmegaConf.to_container(cfg.axes, resolve=True) if cfg.get("axes") else {},
        "policy": cfg.policy.kind if stage != "pointwise" else "pointwise",
        "data": {"source": t.source, "creatives": t.creatives.height,
                 **{f"pairs_{s}": dm.splits[s].height for s in ("train", "val", "test")},
                 "pairs_without_image": dm.pairs_without_image},  # left out with a bad image (skip)
        # creatives whose image could not be used (data.bad_images): policy, skipped, reasons, examples
        "image_failures": dm.image_failures.summary(),
        "test": test, "val": {k: v for k, v in val.items() if k != "example"},
        "stages": stages, "data_seconds": data_s,
        "skipped_batches": module.nonfinite.skipped,  # non-finite loss/gradients skipped ({stage}.nonfinite=skip)
        "parameters": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "wall_seconds": time.perf_counter() - t_start, "checkpoint": best,
    }
    return finish_run(run_dir, metrics, [])


def _check_vocab(state: dict, policy, path: str) -> None:
    saved = state.get("vocab")
    mine = getattr(getattr(policy, "vocab", None), "itos", None)
    if saved is not None and mine is not None and list(saved) != list(mine):
        raise ValueError(f"{path} was trained with another vocabulary ({len(saved)} words, this data gives "
                         f"{len(mine)}): use the same data settings as its SFT run")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    with failure_recorded(cfg):
        metrics = train(cfg)
    t = metrics["test"]
    print(f"{cfg.get('name')} seed {cfg.seed}: test accuracy {t['accuracy']:.4f} "
          f"(first order {t['accuracy_first_order']:.4f}), order-swap consistency {t['consistency']:.4f}")
    print(f"run folder: {cfg.paths.run_dir}")
    return float(metrics["val"].get("accuracy", float("nan")))


if __name__ == "__main__":
    main()
