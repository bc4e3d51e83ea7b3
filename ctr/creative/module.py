"""Lightning trainers of the creative selectors: supervised fine-tuning and GRPO.

Both work on any :class:`ctr.creative.selector.Policy` (the small decoder or a transformers VLM),
and both validate by greedy decoding on the validation pairs (``val/acc``: the answer is the
logged winner; ``val/format``: the output is well formed).

* :class:`SFTModule`: token-level cross-entropy on the target completions (CoT rationales, or the
  answer alone for the "SFT without reasoning" baseline).
* :class:`GRPOModule`: group relative policy optimisation. For every prompt, ``group_size``
  completions are sampled at ``temperature`` from the current policy; each gets the reward of
  :func:`ctr.creative.prompts.rewards` (well formed, correct answer); advantages are the rewards
  normalised within their group, ``(r - mean) / (std + eps)``. The loss per completion token is
  the clipped policy-ratio objective ``-min(rho A, clip(rho, 1-eps, 1+eps) A)`` plus ``kl_beta``
  times the k3 estimate of KL(policy || reference), ``exp(ref - logp) - (ref - logp) - 1``, against
  a frozen copy of the starting (SFT) policy; averaged over each completion's tokens, then over
  completions (``loss_agg=seq_mean``, as in the GRPO paper) or over all tokens (``token_mean``).
  ``updates_per_batch`` optimiser steps reuse each sampled batch (the ratio's "old" policy is the
  sampling one). Dropout is off while sampling and updating.

``nonfinite`` (the config's ``sft.nonfinite`` / ``grpo.nonfinite``): what a NaN/inf training loss
or gradient does, ``"fail"`` (stop, naming the epoch, step, batch and the inputs, outputs and
parameters holding NaN/inf) or ``"skip"`` (skip the batch, counted in ``nonfinite.skipped`` and
kept in checkpoints); see :mod:`ctr.guards`. GRPO optimises manually: it checks that the weights
are finite before sampling (NaN probabilities cannot be sampled), each update's loss, and each
update's gradients before they are clipped (in ``on_before_optimizer_step``, which Lightning
calls inside ``opt.step()``). A skipped GRPO batch takes none of its ``updates_per_batch``
updates: the optimiser still steps (without gradients: AdamW leaves every weight and its state
as they are) and so does the learning-rate schedule, so that the step count is the same as in a
run without skips, and when an update after the first is the one that meets a NaN/inf, the
weights and AdamW state are put back as they were before the batch. Non-finite weights at the end
of fitting always stop the run.
"""

from __future__ import annotations

import copy

import numpy as np
import pytorch_lightning as L
import torch
from torch import Tensor

from ctr.creative.prompts import parse, rewards
from ctr.creative.selector import Policy
from ctr.guards import GuardedModule, NonFiniteGuard, grad_scaler
from ctr.optim import warmup_cosine


def frozen_copy(policy: Policy) -> Policy:
    """A frozen deep copy of ``policy`` (the reference for GRPO's KL), sharing its bound images."""
    bound = policy.__dict__.get("_images")
    policy.__dict__["_images"] = None
    try:
        ref = copy.deepcopy(policy)
    finally:
        policy.__dict__["_images"] = bound
    ref.__dict__["_images"] = bound
    ref.requires_grad_(False)
    return ref.eval()


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """``(r - mean) / (std + eps)`` within consecutive groups of ``group_size`` rewards (std with
    Bessel's correction); a group whose rewards are all equal gets advantages 0."""
    r = rewards.view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)


def grpo_objective(logp: Tensor, old: Tensor, ref: Tensor, adv: Tensor, mask: Tensor, clip_eps: float,
                   kl_beta: float, agg: str = "seq_mean") -> tuple[Tensor, Tensor, Tensor]:
    """The GRPO loss of completions' token log-probs ``logp`` ``[N, T]`` (``old``: at sampling,
    ``ref``: the reference policy's), advantages ``adv`` ``[N]``, token ``mask`` ``[N, T]``.
    Returns ``(loss, per-token KL estimate, per-token ratio)``."""
    mask = mask.float()
    ratio = torch.exp(logp - old)
    a = adv[:, None]
    pg = -torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    d = ref - logp
    kl = torch.exp(d) - d - 1
    per_tok = (pg + kl_beta * kl) * mask
    if agg == "seq_mean":
        loss = (per_tok.sum(1) / mask.sum(1).clamp_min(1)).mean()
    elif agg == "token_mean":
        loss = per_tok.sum() / mask.sum().clamp_min(1)
    else:
        raise ValueError(f"loss_agg must be seq_mean or token_mean, got {agg!r}")
    return loss, kl, ratio


class SelectorModule(GuardedModule, L.LightningModule):
    """Shared parts: the policy, AdamW with warm-up and cosine decay, greedy validation, the
    non-finite guard (``nonfinite``: ``"fail"`` or ``"skip"``)."""

    def __init__(self, policy: Policy, lr: float = 1e-3, weight_decay: float = 0.01,
                 warmup_steps: int = 50, max_new_tokens: int = 96, nonfinite: str = "fail"):
        super().__init__()
        self.policy = policy
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.max_new_tokens = max_new_tokens
        self.nonfinite = NonFiniteGuard(nonfinite)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for n, p in self.policy.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "emb" in n or n.endswith(("tok.weight", "pos.weight", "seg.weight"))
                 else decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.lr)
        # optimiser steps (manual optimisation: max_steps already counts every update)
        total = self.trainer.estimated_stepping_batches
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(self.warmup_steps, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)  # the guard's skip count
        vocab = getattr(self.policy, "vocab", None)
        if vocab is not None:  # the small selector's words, checked when GRPO starts from this
            checkpoint["vocab"] = list(vocab.itos)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        prompts = self.policy.prompts(batch)
        ids, mask = self.policy.generate(prompts, self.max_new_tokens, greedy=True)
        parsed = [parse(t) for t in self.policy.decode(ids, mask)]
        labels = ["B" if y else "A" for y in batch["label"].tolist()]
        n = len(labels)
        self.log("val/acc", float(np.mean([p.answer == y for p, y in zip(parsed, labels)])),
                 batch_size=n, prog_bar=True)
        self.log("val/format", float(np.mean([p.well_formed for p in parsed])), batch_size=n)


class SFTModule(SelectorModule):
    """Supervised fine-tuning on the batch's ``target`` completions (mean token cross-entropy)."""

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        self.nonfinite.start_step(self)
        prompts = self.policy.prompts(batch)
        ids, mask = self.policy.encode(batch["target"])
        lp = self.policy.token_logprobs(prompts, ids, mask)
        loss = -lp.sum() / mask.sum()
        if not self.nonfinite.loss_ok(self, loss, batch_idx, inputs={**batch, "prompts": prompts},
                                      outputs={"token_logprobs": lp}):
            return None  # skipped (nonfinite=skip): no backward, no optimiser step
        self.log("train/loss", loss, prog_bar=True, batch_size=len(ids))
        return loss


class GRPOModule(SelectorModule):
    """GRPO on the policy (see the module docstring); the reference policy is a frozen copy of the
    policy as it is when the module is built."""

    def __init__(self, policy: Policy, group_size: int = 8, temperature: float = 1.0,
                 max_new_tokens: int = 96, clip_eps: float = 0.2, kl_beta: float = 0.04,
                 updates_per_batch: int = 1, reward_format: float = 0.2, reward_accuracy: float = 1.0,
                 loss_agg: str = "seq_mean", lr: float = 1e-4, weight_decay: float = 0.0,
                 warmup_steps: int = 10, max_grad_norm: float = 1.0, adv_eps: float = 1e-4,
                 nonfinite: str = "fail"):
        super().__init__(policy, lr, weight_decay, warmup_steps, max_new_tokens, nonfinite)
        if group_size < 2:
            raise ValueError("GRPO needs group_size >= 2 (advantages are normalised within a group)")
        self.automatic_optimization = False
        self.group_size, self.temperature, self.clip_eps, self.kl_beta = group_size, temperature, clip_eps, kl_beta
        self.updates_per_batch, self.loss_agg = updates_per_batch, loss_agg
        self.reward_format, self.reward_accuracy = reward_format, reward_accuracy
        self.max_grad_norm, self.adv_eps = max_grad_norm, adv_eps
        self.__dict__["ref"] = frozen_copy(policy)  # not a submodule: not trained, not saved

    def on_fit_start(self) -> None:
        self.ref.to(self.device)

    def sample(self, batch: dict) -> dict:
        """One group of completions per prompt with rewards and advantages (no gradient)."""
        g = self.group_size
        self.policy.eval()
        prompts = self.policy.repeat(self.policy.prompts(batch), g)
        ids, mask = self.policy.generate(prompts, self.max_new_tokens, temperature=self.temperature)
        texts = self.policy.decode(ids, mask)
        labels = [("B" if y else "A") for y in batch["label"].tolist() for _ in range(g)]
        r, fmt, acc = rewards(texts, labels, self.reward_format, self.reward_accuracy)
        r = torch.as_tensor(r, dtype=torch.float32, device=ids.device)
        adv = group_advantages(r, g, self.adv_eps)
        std = r.view(-1, g).std(1)
        with torch.no_grad():
            old = self.policy.token_logprobs(prompts, ids, mask)
            ref = self.ref.token_logprobs(prompts, ids, mask)
        return {"prompts": prompts, "ids": ids, "mask": mask, "adv": adv, "old": old, "ref": ref,
                "reward": r.mean(), "format": float(fmt.mean()), "accuracy": float(acc.mean()),
                "flat_groups": float((std < 1e-6).float().mean()),
                "length": float(mask.sum(1).float().mean())}

    def grpo_loss(self, s: dict, outputs: dict | None = None) -> tuple[Tensor, dict]:
        """The GRPO loss of the sampled batch ``s`` and its KL / clipped share; ``outputs``, when
        given, receives the tensors behind the loss (for a non-finite diagnosis)."""
        mask = s["mask"].float()
        lp = self.policy.token_logprobs(s["prompts"], s["ids"], s["mask"])
        loss, kl, ratio = grpo_objective(lp, s["old"], s["ref"], s["adv"], mask, self.clip_eps, self.kl_beta,
                                         self.loss_agg)
        if outputs is not None:
            outputs.update(token_logprobs=lp, old_logprobs=s["old"], ref_logprobs=s["ref"], advantages=s["adv"],
                           ratio=ratio, kl=kl)
        n = mask.sum().clamp_min(1)
        clipped = ((ratio - 1).abs() > self.clip_eps).float()
        return loss, {"kl": float((kl.detach() * mask).sum() / n), "clip_frac": float((clipped * mask).sum() / n)}

    def on_before_optimizer_step(self, optimizer) -> None:
        """Inside ``opt.step()``: the gradients checked (as they came from the backward pass), then
        clipped to ``max_grad_norm``; their total norm is computed once, for both."""
        guard = self.nonfinite
        if not self.max_grad_norm or guard.step_skipped:
            guard.grads_ok(self, optimizer)
            return
        params = [p for p in self.policy.parameters() if p.grad is not None]
        if not params:
            return
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if guard.grads_ok(self, optimizer, norm=norm):
            torch.nn.utils.clip_grads_with_norm_(params, self.max_grad_norm, norm)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        opt, sched = self.optimizers(), self.lr_schedulers()
        guard = self.nonfinite
        guard.start_step(self)
        s = self.sample(batch) if guard.weights_ok(self, batch_idx, inputs=batch, before="sampling") else None
        # skip mode with several updates per batch: the weights and AdamW state before the batch, to
        # put back when a later update meets a NaN/inf
        saved = _snapshot(opt.optimizer) if guard.mode == "skip" and self.updates_per_batch > 1 else None
        loss = info = None
        for _ in range(self.updates_per_batch):
            opt.zero_grad()  # to None: a skipped update steps without gradients, changing nothing
            if not guard.step_skipped:
                outputs: dict = {}
                loss_u, info_u = self.grpo_loss(s, outputs)
                if guard.loss_ok(self, loss_u, batch_idx, inputs={**batch, "prompts": s["prompts"],
                                                                   "completions": s["ids"]}, outputs=outputs):
                    self.manual_backward(loss_u)
                    loss, info = loss_u, info_u
            if not (guard.step_skipped and grad_scaler(self) is not None):
                opt.step()  # on_before_optimizer_step checks the gradients (a skip drops them), clips
            sched.step()  # (fp16's scaler cannot step without gradients: a skipped update does not step)
        if guard.step_skipped:
            if saved is not None:
                _restore(opt.optimizer, saved)
            return None  # skipped (nonfinite=skip): nothing logged
        n = len(batch["label"])
        self.log_dict({"train/loss": loss.detach(), "train/reward": s["reward"], "train/accuracy": s["accuracy"],
                       "train/format": s["format"], "train/kl": info["kl"], "train/clip_frac": info["clip_frac"],
                       "train/flat_groups": s["flat_groups"], "train/length": s["length"]},
                      prog_bar=False, batch_size=n, on_step=True, on_epoch=True)


def _snapshot(opt: torch.optim.Optimizer) -> tuple[list[Tensor], dict]:
    """Copies of the optimiser's parameters and of its per-parameter state."""
    params = [p for g in opt.param_groups for p in g["params"]]
    with torch.no_grad():
        weights = [p.detach().clone() for p in params]
    state = {p: {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in opt.state[p].items()}
             for p in params if p in opt.state}
    return weights, state


def _restore(opt: torch.optim.Optimizer, saved: tuple[list[Tensor], dict]) -> None:
    """Put back what :func:`_snapshot` copied: the weights in place, the state as it was (a
    parameter without state then gets none)."""
    weights, state = saved
    params = [p for g in opt.param_groups for p in g["params"]]
    with torch.no_grad():
        for p, w in zip(params, weights):
            p.copy_(w)
    for p in params:
        if p in state:
            opt.state[p] = state[p]
        else:
            opt.state.pop(p, None)
