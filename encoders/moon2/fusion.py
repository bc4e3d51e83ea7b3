"""MOON2.0's multimodal encoder: a small fusion transformer over image and text tokens, with a
modality-driven mixture of experts.

* :class:`MultimodalEncoder` embeds a product from its image tokens, its text tokens, or both: the
  tokens of the given modalities (each projected to ``dim``, plus a position and a modality
  embedding) go through ``layers`` pre-norm transformer layers and are mean pooled over the valid
  tokens, then projected to ``embed_dim`` and L2-normalised. One network serves the three
  modalities, so every (query, positive, negative) triple can be instantiated in each of them.
* :class:`MoEFeedForward`: the layers' feed-forward as ``experts`` MLPs with a softmax router and
  top-``k`` dispatch (only the selected experts run on a token). It reports the routing
  (:class:`Routing`): mean router probabilities, the Switch-Transformer load-balancing term
  ``E * sum_e f_e P_e`` and the mean router entropy (the sparsity term: low entropy, few experts
  per token). ``ffn="mlp"`` puts a plain MLP of the same active width in its place.
* :class:`ObjectiveWeights`: a learnable experts x objectives matrix ``M`` turning each
  objective's routing ``u_o`` (the mean router probabilities of its query modality's tokens) into
  one weight per objective, ``w = O * softmax_o(u_o . M[:, o])`` (mean 1). A weight that the
  training loss itself minimised would collapse onto the easiest objective; here ``M`` is the
  adversary of a distributionally robust objective: it maximises ``sum_o w_o L_o - lam * KL(w/O ||
  uniform)`` (times ``O``; :meth:`ObjectiveWeights.adversary_loss`, the losses detached) while the encoder
  minimises ``sum_o w_o L_o`` with ``w`` detached. At equilibrium ``w_o`` is proportional to
  ``exp(L_o / lam)``: the modality that lags gets more of the training signal, and the mixing ratio
  of modalities is learned from the data instead of fixed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from encoders.towers import masked_mean

__all__ = ["MLPFeedForward", "MoEFeedForward", "Routing", "FusionLayer", "MultimodalEncoder",
           "ObjectiveWeights", "DualEncoder", "MODALITIES", "equilibrium_weights"]

MODALITIES = ("text", "image", "mm")


@dataclass
class Routing:
    """Router statistics of one forward pass, averaged over the MoE layers.

    ``probs``: mean router probability per expert over the valid tokens ``[E]``; ``balance``: the
    load-balancing term (1 when the load is uniform); ``entropy``: mean router entropy per token
    (nats). ``probs``, ``balance`` and ``entropy`` carry gradients; ``load`` (the share of top-k slots each
    expert received ``[E]``)."""

    probs: Tensor
    balance: Tensor
    entropy: Tensor
    load: Tensor

    @staticmethod
    def mean(parts: list["Routing"]) -> "Routing | None":
        if not parts:
            return None
        return Routing(*(torch.stack([getattr(p, f) for p in parts]).mean(0)
                         for f in ("probs", "balance", "entropy", "load")))


class MLPFeedForward(nn.Module):
    """Linear-GELU-Dropout-Linear."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Routing | None]:
        return self.net(x), None


class MoEFeedForward(nn.Module):
    """``experts`` MLPs (``dim -> hidden -> dim``), a linear softmax router, top-``top_k`` dispatch.

    A token's output is ``sum_{e in topk} g_e * expert_e(x)``, with ``g`` the router probabilities
    of the selected experts renormalised to sum to 1. Only valid tokens (``mask`` True) are routed
    and counted; padding positions get zeros. Each expert runs once on the tokens routed to it.
    """

    def __init__(self, dim: int, hidden: int, experts: int = 4, top_k: int = 2, dropout: float = 0.0):
        super().__init__()
        if not 1 <= top_k <= experts:
            raise ValueError(f"need 1 <= top_k <= experts, got top_k={top_k}, experts={experts}")
        self.experts_n, self.top_k = experts, top_k
        self.router = nn.Linear(dim, experts, bias=False)
        nn.init.normal_(self.router.weight, std=0.02)
        self.experts = nn.ModuleList(MLPFeedForward(dim, hidden, dropout).net for _ in range(experts))

    def route(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(probs [T, E], gates [T, k], index [T, k])`` for flat tokens ``[T, dim]``."""
        probs = self.router(tokens).float().softmax(-1)
        top, index = probs.topk(self.top_k, dim=-1)
        return probs, top / top.sum(-1, keepdim=True), index

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Routing]:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        valid = None if mask is None else mask.reshape(-1)
        tokens = flat if valid is None else flat[valid]
        probs, gates, index = self.route(tokens)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            tok, slot = (index == e).nonzero(as_tuple=True)
            if len(tok):
                out.index_add_(0, tok, (gates[tok, slot].unsqueeze(-1) * expert(tokens[tok])).to(out.dtype))
        if valid is not None:
            full = torch.zeros_like(flat)
            full[valid] = out
            out = full
        n = max(1, tokens.shape[0])
        load = torch.bincount(index.reshape(-1), minlength=self.experts_n).float() / (n * self.top_k)
        p_mean = probs.mean(0) if tokens.shape[0] else probs.new_full((self.experts_n,), 1 / self.experts_n)
        balance = self.experts_n * (load.detach() * p_mean).sum()
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean() if tokens.shape[0] else p_mean.new_zeros(())
        return out.reshape(shape), Routing(p_mean, balance, entropy, load)

    def extra_repr(self) -> str:
        return f"experts={self.experts_n}, top_k={self.top_k}"


class FusionLayer(nn.Module):
    """Pre-norm transformer layer: self-attention over the valid tokens, then the feed-forward."""

    def __init__(self, dim: int, heads: int, ffn: nn.Module, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = ffn

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Routing | None]:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, key_padding_mask=~mask, need_weights=False)[0]
        y, routing = self.ffn(self.norm2(x), mask)
        return x + y, routing


class MultimodalEncoder(nn.Module):
    """Image tokens ``[B, Ti, image_dim]`` and/or text tokens ``[B, Tt, text_dim]`` (with their mask)
    -> normalised ``[B, embed_dim]``; see the module docstring.

    Args:
        image_dim, text_dim: widths of the towers' token features (EfficientNet-Lite0: 1280,
            MiniLM: 384).
        image_tokens, text_tokens: the most tokens of each modality (position embeddings).
        dim, layers, heads: the fusion transformer.
        ffn: ``"moe"`` or ``"mlp"``. ``ffn_mult``: the MLP's hidden width is ``ffn_mult * dim``;
            each of the ``experts`` MoE experts has ``ffn_mult * dim / top_k``, so both cost the
            same per token.
        shortcut: add linear maps of the mean image tokens and the masked mean text tokens (the
            towers' own pooled features) to the fusion output before normalising.
    """

    def __init__(self, image_dim: int, text_dim: int, *, image_tokens: int = 16, text_tokens: int = 32,
                 dim: int = 128, layers: int = 2, heads: int = 4, embed_dim: int = 128,
                 ffn: str = "moe", ffn_mult: int = 4, experts: int = 4, top_k: int = 2,
                 dropout: float = 0.0, shortcut: bool = True):
        super().__init__()
        if ffn not in ("moe", "mlp"):
            raise ValueError(f"ffn must be 'moe' or 'mlp', got {ffn!r}")
        self.ffn_kind, self.embed_dim = ffn, embed_dim
        self.image_in = nn.Sequential(nn.LayerNorm(image_dim), nn.Linear(image_dim, dim))
        self.text_in = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, dim))
        self.image_pos = nn.Parameter(torch.zeros(image_tokens, dim))
        self.text_pos = nn.Parameter(torch.zeros(text_tokens, dim))
        self.modality = nn.Parameter(torch.zeros(2, dim))
        for p in (self.image_pos, self.text_pos, self.modality):
            nn.init.normal_(p, std=0.02)

        def make_ffn() -> nn.Module:
            if ffn == "mlp":
                return MLPFeedForward(dim, ffn_mult * dim, dropout)
            return MoEFeedForward(dim, max(1, ffn_mult * dim // top_k), experts, top_k, dropout)

        self.layers = nn.ModuleList(FusionLayer(dim, heads, make_ffn(), dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, embed_dim)
        self.n_experts = experts if ffn == "moe" else 0
        # linear shortcuts from the towers' pooled features (the dual encoder's heads): the fusion
        # branch adds to them, so the pretrained geometry is there from the first step
        self.image_skip = nn.Linear(image_dim, embed_dim) if shortcut else None
        self.text_skip = nn.Linear(text_dim, embed_dim) if shortcut else None

    def forward(self, image: Tensor | None = None, text: Tensor | None = None,
                text_mask: Tensor | None = None) -> tuple[Tensor, Routing | None]:
        parts, masks = [], []
        if image is not None:
            if image.shape[1] > self.image_pos.shape[0]:
                raise ValueError(f"{image.shape[1]} image tokens > image_tokens={self.image_pos.shape[0]}")
            parts.append(self.image_in(image.float()) + self.image_pos[:image.shape[1]] + self.modality[0])
            masks.append(torch.ones(image.shape[:2], dtype=torch.bool, device=image.device))
        if text is not None:
            if text.shape[1] > self.text_pos.shape[0]:
                raise ValueError(f"{text.shape[1]} text tokens > text_tokens={self.text_pos.shape[0]}")
            parts.append(self.text_in(text.float()) + self.text_pos[:text.shape[1]] + self.modality[1])
            m = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device) if text_mask is None \
                else text_mask.to(text.device).bool()
            masks.append(m)
        if not parts:
            raise ValueError("MultimodalEncoder needs image tokens, text tokens or both")
        x, mask = torch.cat(parts, 1), torch.cat(masks, 1)
        if not bool(mask.any(1).all()):
            raise ValueError("a row has no valid token (an empty text and no image)")
        routings = []
        for layer in self.layers:
            x, r = layer(x, mask)
            if r is not None:
                routings.append(r)
        z = self.out(masked_mean(self.norm(x), mask))
        if self.image_skip is not None and image is not None:
            z = z + self.image_skip(image.float().mean(1))
        if self.text_skip is not None and text is not None:
            z = z + self.text_skip(masked_mean(text.float(), masks[-1]))
        return F.normalize(z, dim=-1), Routing.mean(routings)


class DualEncoder(nn.Module):
    """The plain dual encoder (the encoders issue's baseline) on the same token features: a linear
    head on the mean-pooled image tokens (the tower's own global pooling), one on the masked mean
    of the text tokens (MiniLM's sentence embedding); its multimodal embedding is the normalised
    sum of the two normalised embeddings. Same call signature as :class:`MultimodalEncoder`."""

    def __init__(self, image_dim: int, text_dim: int, *, embed_dim: int = 128, **_ignored):
        super().__init__()
        self.embed_dim, self.n_experts, self.ffn_kind = embed_dim, 0, "none"
        self.image_head = nn.Linear(image_dim, embed_dim)
        self.text_head = nn.Linear(text_dim, embed_dim)

    def forward(self, image: Tensor | None = None, text: Tensor | None = None,
                text_mask: Tensor | None = None) -> tuple[Tensor, None]:
        out = []
        if image is not None:
            out.append(F.normalize(self.image_head(image.float().mean(1)), dim=-1))
        if text is not None:
            m = torch.ones(text.shape[:2], device=text.device) if text_mask is None else text_mask.to(text.device)
            out.append(F.normalize(self.text_head(masked_mean(text.float(), m)), dim=-1))
        if not out:
            raise ValueError("DualEncoder needs image tokens, text tokens or both")
        return F.normalize(sum(out), dim=-1), None


class ObjectiveWeights(nn.Module):
    """Learnable experts x objectives matrix turning routing into objective weights (see module doc).

    ``forward(u)`` with ``u [O, E]`` (row o: the routing of objective o's query inputs) returns
    ``w [O] = O * softmax(a)``, ``a_o = u_o . M[:, o]``. ``M`` starts at zero (uniform weights).
    ``temperature`` is ``lam`` of the robust objective.
    """

    def __init__(self, experts: int, objectives: list[str], temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.objectives, self.temperature = list(objectives), float(temperature)
        self.matrix = nn.Parameter(torch.zeros(experts, len(objectives)))

    def forward(self, routing: Tensor) -> Tensor:
        if routing.shape != self.matrix.T.shape:
            raise ValueError(f"routing must be [objectives={len(self.objectives)}, experts="
                             f"{self.matrix.shape[0]}], got {tuple(routing.shape)}")
        logits = (routing.detach().float() * self.matrix.T).sum(-1)
        return len(self.objectives) * logits.softmax(-1)

    def adversary_loss(self, weights: Tensor, losses: Tensor) -> Tensor:
        """What the optimiser minimises for ``M``: ``-(sum_o w_o L_o) + lam * O * KL(w/O || uniform)``,
        ``L`` detached (the encoder sees ``w`` detached); its minimiser over the simplex is
        :func:`equilibrium_weights`."""
        o = len(self.objectives)
        p = weights / o
        kl = (p * (p.clamp_min(1e-12) * o).log()).sum()
        return -(weights * losses.detach()).sum() + self.temperature * o * kl

    def extra_repr(self) -> str:
        return f"objectives={self.objectives}, temperature={self.temperature:g}"


def equilibrium_weights(losses: Tensor, temperature: float) -> Tensor:
    """The robust objective's maximiser over the simplex: ``O * softmax(L / lam)`` (for tests and logs)."""
    return len(losses) * (losses / temperature).softmax(-1)

