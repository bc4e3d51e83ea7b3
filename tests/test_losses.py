"""Contrastive losses (encoders.losses): naive references, masking, queue, and the 2-process DDP equivalence."""

import time
import traceback
from pathlib import Path

import encoders  # noqa: F401  (torchvision import hook, before anything else)
import pytest
from _gloo import free_port, gloo_group
import torch
import torch.nn.functional as F
from torch import nn

from encoders.losses import (EmbeddingQueue, InfoNCE, LogitScale, NTXent, gather_no_grad,
                             gather_with_grad, matryoshka_slices, rank_and_world)

DT = torch.float64
N, D, H, Q = 8, 6, 2, 3           # global batch, feature dim, hard negatives per row, queue length
WORLD = 2

# Keys with collisions: item 10 in rows 0 and 5 (across ranks), group 2 in rows 2 and 6 (across ranks),
# query 101 in rows 1 and 3; row 4's first hard negative is its own item; the queue holds item 10 and
# group 3 (row 7). -1 appears everywhere and must never match.
PK = torch.tensor([[10, 1], [11, -1], [12, 2], [13, -1], [14, -1], [10, -1], [16, 2], [17, 3]])
QK = torch.tensor([100, 101, 102, 101, 104, 105, 106, 107])
HK = torch.tensor([[[50 + 2 * i, -1], [51 + 2 * i, 7]] for i in range(N)])
HK[4, 0, 0] = 14
HK[2, 1, 1] = 2
UK = torch.tensor([[10, -1], [30, -1], [31, 3]])


def unit(*shape, gen):
    return F.normalize(torch.randn(*shape, generator=gen, dtype=DT), dim=-1)


def features(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(query=unit(N, D, gen=g), positive=unit(N, D, gen=g), hard_negatives=unit(N, H, D, gen=g),
                queue=unit(Q, D, gen=g))


# ---------------------------------------------------------------- naive references


def _match(a, b):
    a, b = a.reshape(-1).tolist(), b.reshape(-1).tolist()
    return any(x == y and x != -1 for x, y in zip(a, b))


def _nll(target, others):
    """-log softmax of `target` among target + others, written out."""
    logits = torch.stack([target] + others)
    return -(target - torch.log(torch.exp(logits).sum()))


def ref_infonce(q, p, s, *, qk=None, pk=None, h=None, hk=None, u=None, uk=None, symmetric=True, mask=True):
    b = q.shape[0]
    # with query and positive keys of the same columns, the query's own keys mask candidates too
    cross = qk is not None and pk is not None and qk.shape[-1] == pk.shape[-1]
    fwd, bwd = [], []
    for i in range(b):
        def fn(j):
            return mask and ((pk is not None and _match(pk[i], pk[j]))
                             or (qk is not None and _match(qk[i], qk[j])))

        def extra(k):  # a hard negative / queue entry with keys k, for query i
            return mask and k is not None and ((pk is not None and _match(pk[i], k))
                                               or (cross and _match(qk[i], k)))

        others = [s * (q[i] @ p[j]) for j in range(b)
                  if j != i and not fn(j) and not (mask and cross and _match(qk[i], pk[j]))]
        if h is not None:
            others += [s * (q[i] @ h[i, m]) for m in range(h.shape[1]) if not extra(None if hk is None else hk[i, m])]
        if u is not None:
            others += [s * (q[i] @ u[n]) for n in range(u.shape[0]) if not extra(None if uk is None else uk[n])]
        fwd.append(_nll(s * (q[i] @ p[i]), others))
        bwd.append(_nll(s * (p[i] @ q[i]), [s * (p[i] @ q[j]) for j in range(b) if j != i and not fn(j)
                                            and not (mask and cross and _match(pk[i], qk[j]))]))
    loss = torch.stack(fwd).mean()
    return (loss + torch.stack(bwd).mean()) / 2 if symmetric else loss


def ref_ntxent(z1, z2, s, keys=None, mask=True):
    b = z1.shape[0]
    z = torch.cat([z1, z2])
    out = []
    for a in range(2 * b):
        pos = (a + b) % (2 * b)
        others = [s * (z[a] @ z[c]) for c in range(2 * b) if c not in (a, pos)
                  and not (mask and keys is not None and _match(keys[a % b], keys[c % b]))]
        out.append(_nll(s * (z[a] @ z[pos]), others))
    return torch.stack(out).mean()


def _grads(loss, xs):
    return torch.autograd.grad(loss, xs)


def _close(a, b, atol=1e-10):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


# ---------------------------------------------------------------- InfoNCE


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("extras", [True, False])
def test_infonce_matches_naive_reference(symmetric, extras):
    f = features(1)
    q, p, h, u = (f[k].requires_grad_() for k in ("query", "positive", "hard_negatives", "queue"))
    s = torch.tensor(7.0, dtype=DT, requires_grad=True)
    kw = dict(hard_negatives=h, hard_negative_keys=HK, queue=u, queue_keys=UK) if extras else {}
    loss = InfoNCE(symmetric=symmetric)(q, p, s, query_keys=QK, positive_keys=PK, **kw)
    ref = ref_infonce(q, p, s, qk=QK[:, None], pk=PK, symmetric=symmetric,
                      **(dict(h=h, hk=HK, u=u, uk=UK) if extras else {}))
    _close(loss, ref)
    xs = [q, p, s] + ([h] if extras else [])     # the queue is detached by design
    for a, b in zip(_grads(loss, xs), _grads(ref, xs)):
        _close(a, b)


def test_infonce_without_keys_or_masking_float32():
    f = features(2)
    q, p, h = (f[k].float().requires_grad_() for k in ("query", "positive", "hard_negatives"))
    s = torch.tensor(5.0, requires_grad=True)
    loss = InfoNCE(mask_false_negatives=False)(q, p, s, query_keys=QK, positive_keys=PK,
                                               hard_negatives=h, hard_negative_keys=HK)
    ref = ref_infonce(q, p, s, h=h, mask=False)
    _close(loss, ref, atol=1e-5)
    for a, b in zip(_grads(loss, [q, p, h, s]), _grads(ref, [q, p, h, s])):
        _close(a, b, atol=1e-6)
    # no keys at all == keys with masking switched off; a float scale works the same as a tensor
    _close(InfoNCE()(q, p, 5.0, hard_negatives=h), loss, atol=1e-6)


def test_duplicate_of_the_positive_is_masked_not_a_negative():
    f = features(3)
    q, p, h = f["query"], f["positive"], f["hard_negatives"][:, :1]
    dup = torch.cat([h, p[:, None]], dim=1)                  # each row's positive again, as a hard negative
    dup_keys = torch.cat([HK[:, :1], PK[:, None]], dim=1)
    loss = InfoNCE()
    base = loss(q, p, 3.0, positive_keys=PK, hard_negatives=h, hard_negative_keys=HK[:, :1])
    _close(loss(q, p, 3.0, positive_keys=PK, hard_negatives=dup, hard_negative_keys=dup_keys), base)
    # the same through the queue, for a single row (otherwise it is a genuine extra negative for the others)
    u, uk = f["queue"], UK[[1, 2]]
    one = loss(q[:1], p[:1], 3.0, positive_keys=PK[:1], queue=u[1:], queue_keys=uk)
    _close(loss(q[:1], p[:1], 3.0, positive_keys=PK[:1], queue=torch.cat([p[:1], u[1:]]),
                queue_keys=torch.cat([PK[:1], uk])), one)
    # unmasked, the duplicates do count as negatives
    off = InfoNCE(mask_false_negatives=False)
    assert off(q, p, 3.0, hard_negatives=dup) > off(q, p, 3.0, hard_negatives=h) + 1e-3


@pytest.mark.parametrize("symmetric", [True, False])
def test_query_own_item_among_candidates_is_masked(symmetric):
    """Click task: query and positive keys are both [item, group]; a candidate that is the query's
    own item (another pair's positive, a hard negative, a queue entry) is no negative."""
    f = features(5)
    q, p, h, u = (f[k].requires_grad_() for k in ("query", "positive", "hard_negatives", "queue"))
    qk = PK.roll(1, dims=0).clone()  # query i's item is positive i-1's item: cross matches everywhere
    qk[0] = torch.tensor([99, -1])
    hk = HK.clone()
    hk[3, 1] = qk[3]  # row 3's second hard negative is its own query item
    uk = UK.clone()
    uk[1] = qk[6]
    loss = InfoNCE(symmetric=symmetric)(q, p, 6.0, query_keys=qk, positive_keys=PK, hard_negatives=h,
                                        hard_negative_keys=hk, queue=u, queue_keys=uk)
    ref = ref_infonce(q, p, 6.0, qk=qk, pk=PK, h=h, hk=hk, u=u, uk=uk, symmetric=symmetric)
    _close(loss, ref)
    for a, b in zip(_grads(loss, [q, p, h]), _grads(ref, [q, p, h])):
        _close(a, b)
    # the masked candidates really are left out: the same as without cross-matching keys
    fresh = torch.full_like(qk, -1)
    assert not torch.isclose(loss, InfoNCE(symmetric=symmetric)(
        q, p, 6.0, query_keys=fresh, positive_keys=PK, hard_negatives=h, hard_negative_keys=hk,
        queue=u, queue_keys=uk))


def test_minus_one_keys_never_mask():
    f = features(4)
    q, p, h, u = f["query"], f["positive"], f["hard_negatives"], f["queue"]

    def none(k):
        return torch.full_like(k, -1)

    loss = InfoNCE()
    plain = loss(q, p, 4.0, hard_negatives=h, queue=u)
    got = loss(q, p, 4.0, query_keys=none(QK), positive_keys=none(PK), hard_negatives=h,
               hard_negative_keys=none(HK), queue=u, queue_keys=none(UK))
    _close(got, plain)


def test_infonce_accuracy_empty_queue_and_bad_shapes():
    f = features(5)
    q = f["query"]
    loss = InfoNCE()
    loss(q, q, 100.0, positive_keys=torch.arange(N))
    assert float(loss.last_accuracy) == 1.0
    loss(q, -q, 100.0)
    assert float(loss.last_accuracy) == 0.0
    queue = EmbeddingQueue(D, 4, n_keys=2).to(DT)
    u, uk = queue.get()
    assert u.shape == (0, D) and uk.shape == (0, 2)
    _close(loss(q, f["positive"], 2.0, positive_keys=PK, queue=u, queue_keys=uk),
           loss(q, f["positive"], 2.0, positive_keys=PK))
    with pytest.raises(ValueError):
        loss(q, f["positive"][:3], 2.0)


# ---------------------------------------------------------------- LogitScale


def test_logit_scale_clamps_and_checkpoints():
    ls = LogitScale()
    assert isinstance(ls.log_scale, nn.Parameter)
    _close(ls().double(), torch.tensor(1 / 0.07, dtype=DT), atol=1e-4)
    with torch.no_grad():
        ls.log_scale.fill_(10.0)
    _close(ls.clamp_()().double(), torch.tensor(100.0, dtype=DT), atol=1e-3)
    with torch.no_grad():
        ls.log_scale.fill_(-3.0)
    assert float(ls.clamp_()().detach()) == 1.0
    fixed = LogitScale(20.0, learnable=False)
    assert not list(fixed.parameters()) and "log_scale" in fixed.state_dict()
    fixed.load_state_dict(ls.state_dict())
    assert float(fixed().detach()) == 1.0
    with pytest.raises(ValueError):
        LogitScale(init=0.0)


# ---------------------------------------------------------------- queue


def test_queue_fifo_wraps_and_round_trips():
    q = EmbeddingQueue(dim=2, size=4, n_keys=2)
    assert len(q) == 0

    def rows(a, b):
        x = torch.arange(a, b, dtype=torch.float32)
        return torch.stack([x, -x], 1), torch.stack([torch.arange(a, b), torch.arange(a, b) + 100], 1)

    q.enqueue(*rows(0, 3))
    e, k = q.get()
    assert e[:, 0].tolist() == [0, 1, 2] and k[:, 1].tolist() == [100, 101, 102]
    q.enqueue(*rows(3, 6))                                   # wraps: 4 and 5 overwrite the oldest 0 and 1
    e, k = q.get()
    assert e[:, 0].tolist() == [4, 5, 2, 3] and k[:, 0].tolist() == [4, 5, 2, 3] and int(q.ptr) == 2
    q.enqueue(*rows(6, 15))                                  # larger than the queue: the newest 4 survive
    e, k = q.get()
    assert sorted(e[:, 0].tolist()) == [11, 12, 13, 14] and sorted(k[:, 0].tolist()) == [11, 12, 13, 14]
    q.enqueue(*rows(15, 16))                                 # and the oldest of those goes first
    assert sorted(q.get()[0][:, 0].tolist()) == [12, 13, 14, 15]
    q.enqueue(torch.zeros(1, 2))                             # no keys: -1
    assert (q.get()[1] == -1).any(dim=1).sum() == 1

    other = EmbeddingQueue(dim=2, size=4, n_keys=2)
    other.load_state_dict(q.state_dict())
    assert set(q.state_dict()) == {"emb", "keys", "ptr", "filled"}
    for a, b in zip(q.get(), other.get()):
        assert torch.equal(a, b)
    assert int(other.ptr) == int(q.ptr) and len(other) == 4

    snap, _ = other.get()                                    # get() is a snapshot
    other.enqueue(torch.full((4, 2), 9.0), torch.zeros(4, 2, dtype=torch.long))
    assert not (snap == 9).any()

    off = EmbeddingQueue(dim=2, size=0)
    off.enqueue(*rows(0, 3)[:1])
    assert off.get()[0].shape == (0, 2) and len(off) == 0


# ---------------------------------------------------------------- NT-Xent, Matryoshka, helpers


@pytest.mark.parametrize("with_keys", [True, False])
def test_ntxent_matches_naive_reference(with_keys):
    f = features(6)
    z1, z2 = f["query"].requires_grad_(), f["positive"].requires_grad_()
    s = torch.tensor(6.0, dtype=DT, requires_grad=True)
    keys = PK if with_keys else None
    loss = NTXent()(z1, z2, s, keys=keys)
    ref = ref_ntxent(z1, z2, s, keys=keys)
    _close(loss, ref)
    for a, b in zip(_grads(loss, [z1, z2, s]), _grads(ref, [z1, z2, s])):
        _close(a, b)
    _close(NTXent(mask_false_negatives=False)(z1, z2, 6.0, keys=PK), ref_ntxent(z1, z2, 6.0))


def test_matryoshka_slices():
    x = torch.randn(3, 2, 8)
    out = matryoshka_slices(x, [2, 8])
    assert [o.shape for o in out] == [(3, 2, 2), (3, 2, 8)]
    _close(out[0].norm(dim=-1), torch.ones(3, 2), atol=1e-6)
    _close(out[1], F.normalize(x, dim=-1), atol=1e-6)
    with pytest.raises(ValueError):
        matryoshka_slices(x, [9])


def test_gathers_are_identity_when_not_distributed():
    x = torch.randn(3, 2, requires_grad=True)
    assert rank_and_world() == (0, 1)
    assert gather_with_grad(x) is x and gather_no_grad(x) is x


# ---------------------------------------------------------------- distributed (gloo, 2 CPU processes)


class _Encoders(nn.Module):
    """Two small towers and a learnable scale; forward is the InfoNCE loss of the given rows."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q = nn.Linear(5, D).to(DT)
        self.p = nn.Linear(5, D).to(DT)
        self.scale = LogitScale(init=4.0).to(DT)
        self.loss = InfoNCE(symmetric=True)

    def forward(self, x):
        fq = F.normalize(self.q(x["xq"]), dim=-1)
        fp = F.normalize(self.p(x["xp"]), dim=-1)
        fh = F.normalize(self.p(x["xh"]), dim=-1)
        return self.loss(fq, fp, self.scale(), query_keys=x["qk"], positive_keys=x["pk"], hard_negatives=fh,
                         hard_negative_keys=x["hk"], queue=x["u"], queue_keys=x["uk"])


def _raw(rows):
    g = torch.Generator().manual_seed(11)
    x = dict(xq=torch.randn(N, 5, generator=g, dtype=DT), xp=torch.randn(N, 5, generator=g, dtype=DT),
             xh=torch.randn(N, H, 5, generator=g, dtype=DT), v1=torch.randn(N, 5, generator=g, dtype=DT),
             qk=QK, pk=PK, hk=HK)
    x = {k: v[rows] for k, v in x.items()}
    x.update(u=unit(Q, D, gen=g), uk=UK)           # the queue is the same on every rank
    return x


def _ntxent_step(enc, scale, x):
    z1 = F.normalize(enc(x["xq"]), dim=-1)
    z2 = F.normalize(enc(x["xq"] + 0.3 * x["v1"]), dim=-1)
    return NTXent()(z1, z2, scale(), keys=x["pk"])


def _ntxent_model():
    torch.manual_seed(1)
    return nn.Linear(5, D).to(DT), LogitScale(init=3.0).to(DT)


def _ddp_worker(rank, world, port, out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    try:
        with gloo_group(rank, world, port):
            b = N // world
            x = _raw(slice(rank * b, (rank + 1) * b))
            res = {}

            model = DDP(_Encoders())                              # InfoNCE: DDP averages the gradients
            loss = model(x)
            loss.backward()
            res["infonce"] = (loss.detach(), [p.grad for p in model.module.parameters()])

            enc, scale = _ntxent_model()                          # NT-Xent: the average done by hand
            loss = _ntxent_step(enc, scale, x)
            loss.backward()
            grads = []
            for p in [*enc.parameters(), *scale.parameters()]:
                dist.all_reduce(p.grad)
                grads.append(p.grad / world)
            res["ntxent"] = (loss.detach(), grads)

            queue = EmbeddingQueue(D, size=6, n_keys=2).to(DT)   # every rank ends with the global batch
            queue.enqueue(torch.ones(b, D, dtype=DT) * (rank * b + torch.arange(b))[:, None], x["pk"])
            res["queue"] = queue.get()
            torch.save(res, Path(out) / f"rank{rank}.pt")
            del model, loss, res  # the DDP reducer holds the group: it must go before the group
    except BaseException:
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def test_ddp_two_processes_match_single_process(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, WORLD, port, str(tmp_path))) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 90                          # a rank that dies leaves the other in a
    try:                                                      # collective until gloo's 30 s timeout
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
    finally:
        hung = [p for p in procs if p.is_alive()]
        for p in hung:
            p.kill()
            p.join()
    errors = "\n".join(f.read_text() for f in sorted(tmp_path.glob("rank*.err")))
    assert not hung, f"DDP workers hung\n{errors}"
    assert all(p.exitcode == 0 for p in procs), f"exit codes {[p.exitcode for p in procs]}\n{errors}"
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    x = _raw(slice(None))
    model = _Encoders()
    ref = model(x)
    ref.backward()
    _close(sum(r["infonce"][0] for r in res) / WORLD, ref.detach())
    for r in res:
        for a, b in zip(r["infonce"][1], model.parameters()):
            _close(a, b.grad)

    enc, scale = _ntxent_model()
    ref = _ntxent_step(enc, scale, x)
    ref.backward()
    _close(sum(r["ntxent"][0] for r in res) / WORLD, ref.detach())
    for r in res:
        for a, b in zip(r["ntxent"][1], [*enc.parameters(), *scale.parameters()]):
            _close(a, b.grad)

    for r in res:
        e, k = r["queue"]
        assert e[:, 0].tolist() == [2, 3, 4, 5, 6, 7] and torch.equal(k, PK[2:])  # the newest 6 of 8
