"""Non-finite losses and gradients in training: stop with a diagnosis, or skip the batch.

A training module (``CTRModule``, ``ContrastiveModule``, ``Moon2Module``, Creative4U's
``SFTModule``, ``GRPOModule`` and ``PointwiseModule``) owns a :class:`NonFiniteGuard` built from
its ``nonfinite`` argument (the configs' ``optim.nonfinite``; Creative4U's ``sft.nonfinite``,
``grpo.nonfinite``, ``pointwise.nonfinite``) and calls it at four points:

* ``start_step(module)``, first thing in ``training_step``;
* ``loss_ok(module, loss, batch_idx, inputs, outputs)`` once the loss is known: one
  ``torch.isfinite(loss)`` and one host sync per step (the check ``CTRModule`` always had);
  the batch and outputs are only read when it fires;
* ``grads_ok(module, optimizer)`` in ``on_before_optimizer_step``: the gradients' 2-norms (one
  fused ``torch._foreach_norm``, as ``clip_grad_norm_(error_if_nonfinite=True)`` judges them) and
  one host sync per step, so that a non-finite gradient behind a finite loss (an overflow in the
  backward pass) is caught before it reaches the weights; on a CPU this costs about a fifth of
  a fused Adam step;
* (``weights_ok(module, batch_idx, inputs)``, where a step uses the weights before it has a
  loss: GRPO's sampling; one fused norm and one host sync);
* ``check_weights(module)`` in ``on_fit_end``: a model with a NaN/inf weight or buffer is never
  handed on, whatever the mode.

``nonfinite: fail`` (the default) raises :class:`NonFiniteError` naming the epoch, global step and
batch index and every tensor holding a NaN/inf: the batch's inputs, the model's outputs, the
parameters and their gradients, with counts. ``nonfinite: skip`` skips the batch instead: the
weights, the optimiser's state and the module's buffers (BatchNorm/Dice statistics, embedding
queues) stay as they were before it; the batch is counted (``skipped``, in ``metrics.json`` as
``skipped_batches``) and logged as a warning with the same diagnosis. Skip mode copies the
module's persistent buffers (the checkpointed state: running statistics, queues; not constant
tables such as frozen image vectors) at the start of every step so that they can be put back (into
copies allocated once, on the first step, and again only when the buffers change, e.g. after
``.to()``).

Under DDP the ranks agree on every decision (each flag is summed over the ranks: one scalar
all-reduce per check), so that all of them skip or stop together. With fp16 mixed precision the gradients are left to Lightning's
gradient scaler, which skips overflowing steps itself.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

MODES = ("fail", "skip")
MAX_LISTED = 12  # tensors listed per section of a diagnosis

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """Training met a NaN/inf loss, gradient or weight; the message says where and in what."""


def named_tensors(obj, prefix: str) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` for every tensor in ``obj``: a tensor, a dict, list or tuple of them, or
    a dataclass such as :class:`ctr.data.batch.Batch` (named ``prefix.field.key``)."""
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from named_tensors(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from named_tensors(v, f"{prefix}[{i}]")
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from named_tensors(getattr(obj, f.name), f"{prefix}.{f.name}")


def nonfinite_tensors(named: Iterable[tuple[str, Tensor | None]]) -> list[str]:
    """One line per floating tensor of ``named`` holding NaN/inf values:
    ``"name [shape]: n of N values non-finite (a nan, b inf)"``."""
    out = []
    for name, t in named:
        if t is None or not torch.is_tensor(t) or not (t.is_floating_point() or t.is_complex()):
            continue
        t = t.detach()
        if t.is_sparse:
            t = t.coalesce().values()
        n = int((~torch.isfinite(t)).sum())
        if n:
            nan = int(torch.isnan(t).sum())
            out.append(f"{name} {list(t.shape)}: {n} of {t.numel()} values non-finite ({nan} nan, {n - nan} inf)")
    return out


def _section(title: str, lines: list[str]) -> list[str]:
    if not lines:
        return [f"  {title}: all finite"]
    shown = [f"    {x}" for x in lines[:MAX_LISTED]]
    more = [f"    ... and {len(lines) - MAX_LISTED} more"] if len(lines) > MAX_LISTED else []
    return [f"  {title}: {len(lines)} with non-finite values", *shown, *more]


def _any_rank(flag: Tensor) -> bool:
    """Whether ``flag`` (a 0-d bool tensor) is true on any rank of the process group (one
    all-reduce when distributed); the single host sync of a check."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = flag.float()
        dist.all_reduce(flag)
    return bool(flag)


class NonFiniteGuard:
    """Watches one module's training for NaN/inf; see the module docstring.

    ``mode``: ``"fail"`` (raise :class:`NonFiniteError`) or ``"skip"`` (skip the batch, count it
    in ``skipped``). ``step_skipped`` is true from a skip until the next ``start_step``."""

    def __init__(self, mode: str = "fail"):
        if mode not in MODES:
            raise ValueError(f"nonfinite must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.skipped = 0
        self.step_skipped = False
        self._step: dict = {}  # this step's batch index, loss, inputs and outputs, for a diagnosis
        self._live: list[Tensor] = []   # skip mode: the module's persistent buffers
        self._saved: list[Tensor] = []  # and their copies at the start of this step

    # ---- per step -----------------------------------------------------------------------------
    def start_step(self, module: nn.Module) -> None:
        """Call first in ``training_step``: forgets the last step; in skip mode, copies the
        module's persistent buffers (running statistics, queues), which the step may change."""
        self.step_skipped = False
        self._step = {}
        if self.mode == "skip":
            self._save_buffers(module)

    def loss_ok(self, module, loss: Tensor, batch_idx: int, inputs=None, outputs=None) -> bool:
        """True when ``loss`` is finite (on every rank). Otherwise raises (fail) or skips the
        batch and returns False (skip: ``training_step`` then returns None). ``inputs`` (the
        batch) and ``outputs`` (name -> tensor): tensors in dicts, lists or dataclasses such as
        ``Batch``, only read when the check fires."""
        self._step = {"batch_idx": batch_idx, "loss": loss.detach(), "inputs": inputs or {},
                      "outputs": outputs or {}}
        if not _any_rank(~torch.isfinite(loss.detach()).all()):
            return True
        self._fire(module, f"non-finite training loss ({self._loss_text()})", grads=False)
        return False

    def grads_ok(self, module, optimizer, norm: Tensor | None = None) -> bool:
        """True when every gradient the optimiser is about to apply is finite. Otherwise raises
        (fail) or sets every gradient to None, so that the optimiser leaves every weight and its
        own state as they are (skip), and returns False. A no-op under fp16's gradient scaler.
        ``norm``: the gradients' total 2-norm when the caller has it already (for clipping, e.g.
        ``torch.nn.utils.get_total_norm``): judged instead of computing the norms again."""
        if self.step_skipped or grad_scaler(module) is not None:
            return True
        if norm is None:
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            grads = [g.coalesce().values() if g.is_sparse else g for g in grads]
            if not grads:
                return True
            finite = _all_finite(grads)  # false when a value is nan/inf (or |g| ~1e19 overflows)
        else:
            finite = torch.isfinite(norm.detach().float()).all()
        if not _any_rank(~finite):
            return True
        self._fire(module, f"non-finite gradients behind a finite loss ({self._loss_text()})", grads=True)
        for g in optimizer.param_groups:
            for p in g["params"]:
                p.grad = None
        return False

    def weights_ok(self, module, batch_idx: int, inputs=None, before: str = "the step") -> bool:
        """True when every parameter of ``module`` is finite (one fused 2-norm and one host sync),
        for a step that uses the weights before it has a loss to check, such as GRPO's sampling
        (which cannot draw from NaN probabilities). Otherwise raises (fail) or skips the batch and
        returns False (skip). ``before`` names what the weights were about to do."""
        self._step = {"batch_idx": batch_idx, "inputs": inputs or {}, "outputs": {}}
        params = [p.detach() for p in module.parameters()]
        if not params or not _any_rank(~_all_finite(params)):
            return True
        self._fire(module, f"non-finite weights before {before}", grads=False)
        return False

    def end_step(self) -> None:
        """Drop this step's references to the batch and outputs (call in ``on_train_batch_end``)."""
        self._step = {}

    # ---- after training -----------------------------------------------------------------------
    def check_weights(self, module: nn.Module) -> None:
        """Raise :class:`NonFiniteError` when a parameter or floating buffer is NaN/inf (both modes;
        on every rank when one rank's shard has one)."""
        bad = nonfinite_tensors([*module.named_parameters(), *module.named_buffers()])
        if _any_rank(torch.tensor(bool(bad), device=getattr(module, "device", None))):
            lines = _section("parameters and buffers", bad) if bad else ["  (in another rank's shard)"]
            raise NonFiniteError("training ended with non-finite weights (skipped batches: "
                                 f"{self.skipped}); the model is not usable:\n" + "\n".join(lines))

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get("skipped", 0))

    # ---- internals ----------------------------------------------------------------------------
    def _save_buffers(self, module: nn.Module) -> None:
        """Copy the module's persistent buffers into ``_saved``: the copies are allocated on the
        first step and again only when the buffers changed (a buffer replaced, e.g. by ``.to()``,
        added or removed, or resized); otherwise one fused copy."""
        live = _persistent_buffers(module)
        same = len(live) == len(self._live) and all(
            b is old and b.shape == s.shape for b, old, s in zip(live, self._live, self._saved))
        with torch.no_grad():
            if not same:
                self._live, self._saved = live, [b.detach().clone() for b in live]
            elif live:
                torch._foreach_copy_(self._saved, live)

    def _loss_text(self) -> str:
        loss = self._step.get("loss")
        return "loss unknown" if loss is None else f"loss {loss.float().mean().item():.6g}"

    def _where(self, module) -> str:
        return (f"epoch {module.current_epoch}, global step {module.global_step}, "
                f"batch {self._step.get('batch_idx', '?')}")

    def diagnose(self, module, grads: bool) -> str:
        """The tensors holding NaN/inf: this step's inputs and outputs, the parameters and (after
        the backward pass) their gradients. Reads every parameter: only called when a check fires."""
        params = list(module.named_parameters())
        lines = [*_section("batch inputs", nonfinite_tensors(named_tensors(self._step.get("inputs", {}), "batch"))),
                 *_section("outputs", nonfinite_tensors(named_tensors(self._step.get("outputs", {}), "output"))),
                 *_section("parameters", nonfinite_tensors(params))]
        if grads:
            bad = nonfinite_tensors((f"{n}.grad", p.grad) for n, p in params)
            lines += _section("gradients", bad) if bad else [
                "  gradients: every value finite, but a 2-norm overflows float32 (values beyond ~1e19)"]
        return "\n".join(lines)

    def _fire(self, module, what: str, grads: bool) -> None:
        where = self._where(module)
        report = self.diagnose(module, grads)
        if self.mode == "fail":
            raise NonFiniteError(f"{what} at {where}; optim.nonfinite=skip would skip such batches:\n{report}")
        self.skipped += 1
        self.step_skipped = True
        if self._live:
            with torch.no_grad():
                torch._foreach_copy_(self._live, self._saved)
        log.warning("skipped the batch at %s: %s (%d skipped so far):\n%s", where, what, self.skipped, report)


def _persistent_buffers(module: nn.Module) -> list[Tensor]:
    """The buffers a checkpoint keeps (``persistent=True``): the state training changes."""
    return [b for m in module.modules() for name, b in m._buffers.items()
            if b is not None and name not in m._non_persistent_buffers_set]


def _all_finite(tensors: list[Tensor]) -> Tensor:
    """A 0-d bool tensor: whether every value of ``tensors`` is finite, judged on their 2-norms
    (one fused ``torch._foreach_norm``) as float32: a norm that overflows float32 counts as
    non-finite, whatever the tensors' dtype. No host sync."""
    norms = torch._foreach_norm(tensors, 2)
    # stack promotes mixed dtypes exactly (bf16/f16 -> f32); .float() then keeps float32's range
    return torch.isfinite(torch.stack(norms).float()).all()


def grad_scaler(module):
    """Lightning's fp16 gradient scaler when the module trains under one, else None."""
    try:
        plugin = module.trainer.precision_plugin
    except (AttributeError, RuntimeError):
        return None
    return getattr(plugin, "scaler", None)


class GuardedModule:
    """Mixin for a LightningModule that holds ``self.nonfinite`` (a :class:`NonFiniteGuard`): checks
    the gradients before every optimiser step, ends the guard's step after every batch, checks the
    weights when fitting ends, and keeps the skip count in checkpoints (restored when a fit
    resumes, not when the best weights are reloaded for evaluation). A module that overrides one of
    these hooks calls ``super()`` in it. Put it first among the bases:
    ``class M(GuardedModule, pl.LightningModule)``."""

    nonfinite: NonFiniteGuard

    def on_before_optimizer_step(self, optimizer) -> None:
        self.nonfinite.grads_ok(self, optimizer)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.nonfinite.end_step()

    def on_fit_end(self) -> None:
        self.nonfinite.check_weights(self)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["nonfinite"] = self.nonfinite.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        from ctr.runs import fitting

        if fitting(self):
            self.nonfinite.load_state_dict(checkpoint.get("nonfinite") or {})
