"""Generative creative selectors behind one policy interface.

:class:`Policy` is what the SFT and GRPO trainers (:mod:`ctr.creative.module`) use: turn a batch
of pairs into model inputs (:meth:`Policy.prompts`), score completions token by token
(:meth:`Policy.token_logprobs`), sample or greedily decode completions (:meth:`Policy.generate`),
and convert between text and token ids. Two implementations:

* :class:`SmallSelector`: a small decoder-only transformer over the frozen image tower's token
  features of both creatives (projected, with an A/B segment embedding) and the prompt's words
  (a word-level vocabulary), then the completion; causal attention, a KV cache for generation.
  Trains on CPU.
* :class:`ctr.creative.hf.HFSelector`: a vision-language model loaded from a local path with
  ``transformers``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
_TOKEN = re.compile(r"</?[a-z]+>|[^\s]+")


class Policy(nn.Module):
    """The interface the creative-selection trainers need (see the module docstring)."""

    #: which image input :meth:`bind` needs from the data: "tokens" (tower features) or "pixels"
    needs: str = "tokens"

    def bind(self, images) -> None:
        """Attach the creatives' images (:class:`ctr.creative.data.CreativeImages`)."""
        raise NotImplementedError

    def prompts(self, batch: dict):
        """Model inputs for the batch's pairs (images ``a``, ``b`` and ``prompt`` texts)."""
        raise NotImplementedError

    def repeat(self, prompts, n: int):
        """Every prompt ``n`` times in a row (for GRPO's groups)."""
        raise NotImplementedError

    def encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Completion texts -> ``(ids [B, T], mask [B, T])``, ending with the end token."""
        raise NotImplementedError

    def decode(self, ids: Tensor, mask: Tensor) -> list[str]:
        raise NotImplementedError

    def token_logprobs(self, prompts, ids: Tensor, mask: Tensor) -> Tensor:
        """``[B, T]`` log-probability of each completion token given the prompt (0 where masked)."""
        raise NotImplementedError

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens: int, temperature: float = 1.0,
                 greedy: bool = False) -> tuple[Tensor, Tensor]:
        """Sampled (or greedy) completions ``(ids [B, T], mask [B, T])``; the mask covers the
        tokens up to and including the end token."""
        raise NotImplementedError


class WordVocab:
    """A word-level vocabulary (closed: the prompts and rationales are templated); unknown words
    map to ``<unk>``."""

    def __init__(self, words: list[str]):
        specials = [PAD, UNK, BOS, EOS]
        self.itos = specials + sorted(set(words) - set(specials))
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def from_texts(cls, texts) -> "WordVocab":
        words: set[str] = set()
        for t in texts:
            words.update(tokenize(t))
        return cls(sorted(words))

    def __len__(self) -> int:
        return len(self.itos)

    def ids(self, text: str) -> list[int]:
        return [self.stoi.get(w, 1) for w in tokenize(text)]


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text)


def pad_ids(rows: list[list[int]], pad: int = 0, length: int | None = None) -> tuple[Tensor, Tensor]:
    n = max([len(r) for r in rows] + [1]) if length is None else length
    ids = torch.full((len(rows), n), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.bool)
    for i, r in enumerate(rows):
        r = r[:n]
        ids[i, :len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, :len(r)] = True
    return ids, mask


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, allowed: Tensor, cache: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None],
                                           dropout_p=self.drop.p if self.training else 0.0)
        x = x + self.drop(self.out(h.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.ff(self.ln2(x))), (k, v)


@dataclass
class SmallPrompt:
    """The small selector's prefix: image token features of A and B and the prompt's word ids."""

    img_a: Tensor   # [B, Ti, C]
    img_b: Tensor   # [B, Ti, C]
    ids: Tensor     # [B, P]
    mask: Tensor    # [B, P]

    def repeat(self, n: int) -> "SmallPrompt":
        return SmallPrompt(*(x.repeat_interleave(n, 0) for x in (self.img_a, self.img_b, self.ids, self.mask)))


class SmallSelector(Policy):
    """A small decoder over ``[image A tokens, image B tokens, prompt words, <bos>, completion]``.

    Args:
        vocab: the word vocabulary (prompts and completions).
        image_dim / image_tokens: the tower features' width and tokens per image (a square grid).
        image_grid: average-pool each image's token grid to ``image_grid`` x ``image_grid`` tokens
            and add their mean as one more token (None: keep the grid as it is).
        d_model, n_layers, n_heads, dropout: the transformer.
        max_prompt, max_completion: prompt words kept; the longest completion (position table).
    """

    needs = "tokens"

    def __init__(self, vocab: WordVocab, image_dim: int, image_tokens: int, d_model: int = 96,
                 n_layers: int = 2, n_heads: int = 4, dropout: float = 0.1, max_prompt: int = 28,
                 max_completion: int = 128, image_grid: int | None = 2):
        super().__init__()
        self.vocab = vocab
        side = int(round(image_tokens ** 0.5))
        if image_grid is not None:
            if side * side != image_tokens or side % image_grid:
                raise ValueError(f"image_grid={image_grid} needs a square token grid divisible by it, "
                                 f"got {image_tokens} tokens")
            image_tokens = image_grid * image_grid + 1
        self.grid, self.image_grid = side, image_grid
        self.image_tokens, self.max_prompt, self.max_completion = image_tokens, max_prompt, max_completion
        self.prefix_len = 2 * image_tokens + max_prompt
        self.img_in = nn.Sequential(nn.LayerNorm(image_dim), nn.Linear(image_dim, d_model))
        self.tok = nn.Embedding(len(vocab), d_model)
        self.pos = nn.Embedding(self.prefix_len + max_completion + 1, d_model)
        self.seg = nn.Embedding(4, d_model)  # image A, image B, prompt, completion
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, dropout) for _ in range(n_layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, len(vocab), bias=False)
        self.head.weight = self.tok.weight  # tied
        self.drop = nn.Dropout(dropout)
        self._images: Tensor | None = None
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        nn.init.normal_(self.seg.weight, std=0.02)
        segs = torch.tensor([0] * image_tokens + [1] * image_tokens + [2] * max_prompt)
        self.register_buffer("_prefix_seg", segs, persistent=False)
        self.register_buffer("_img_pos", torch.arange(image_tokens), persistent=False)

    # -- data ---------------------------------------------------------------------------------
    def bind(self, images) -> None:
        if images.tokens is None:
            raise ValueError("the small selector needs the image tower's token features (data tokens=true)")
        self._images = images

    def _image_rows(self, rows: Tensor) -> Tensor:
        if self._images is None:
            raise RuntimeError("bind() the creatives' images before use")
        return self.pool(self._images.token_rows(rows, self.head.weight.device))

    def pool(self, x: Tensor) -> Tensor:
        """``[B, side*side, C]`` tower tokens -> the selector's image tokens."""
        if self.image_grid is None:
            return x
        b, t, c = x.shape
        g = F.adaptive_avg_pool2d(x.transpose(1, 2).reshape(b, c, self.grid, self.grid), self.image_grid)
        return torch.cat([g.flatten(2).transpose(1, 2), x.mean(1, keepdim=True)], 1)

    def prompts(self, batch: dict) -> SmallPrompt:
        rows = [self.vocab.ids(p) for p in batch["prompt"]]
        long = [i for i, r in enumerate(rows) if len(r) > self.max_prompt]
        if long:
            raise ValueError(f"prompt {long[0]} of the batch has {len(rows[long[0]])} words, more than "
                             f"max_prompt={self.max_prompt}: raise policy.max_prompt")
        ids, mask = pad_ids(rows, length=self.max_prompt)
        dev = self.head.weight.device
        return SmallPrompt(self._image_rows(batch["a"]), self._image_rows(batch["b"]), ids.to(dev), mask.to(dev))

    def repeat(self, prompts: SmallPrompt, n: int) -> SmallPrompt:
        return prompts.repeat(n)

    def encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        eos = self.vocab.stoi[EOS]
        rows = [self.vocab.ids(t) + [eos] for t in texts]
        long = [i for i, r in enumerate(rows) if len(r) > self.max_completion]
        if long:
            raise ValueError(f"completion {long[0]} has {len(rows[long[0]])} tokens, more than "
                             f"max_completion={self.max_completion}: raise policy.max_completion")
        ids, mask = pad_ids(rows)
        return ids.to(self.head.weight.device), mask.to(self.head.weight.device)

    def decode(self, ids: Tensor, mask: Tensor) -> list[str]:
        eos = self.vocab.stoi[EOS]
        out = []
        for row, m in zip(ids.tolist(), mask.tolist()):
            words = [self.vocab.itos[i] for i, keep in zip(row, m) if keep and i != eos]
            out.append(" ".join(words))
        return out

    # -- model --------------------------------------------------------------------------------
    def _prefix(self, p: SmallPrompt) -> tuple[Tensor, Tensor]:
        x = torch.cat([self.img_in(p.img_a) + self.pos.weight[self._img_pos],
                       self.img_in(p.img_b) + self.pos.weight[self._img_pos],
                       self.tok(p.ids) + self.pos.weight[2 * self.image_tokens + torch.arange(
                           p.ids.shape[1], device=p.ids.device)]], 1)
        x = x + self.seg(self._prefix_seg[: x.shape[1]])
        keep = torch.cat([torch.ones(p.ids.shape[0], 2 * self.image_tokens, dtype=torch.bool, device=x.device),
                          p.mask], 1)
        return x, keep

    def _completion_emb(self, ids: Tensor, start: int) -> Tensor:
        pos = self.prefix_len + start + torch.arange(ids.shape[1], device=ids.device)
        return self.tok(ids) + self.pos(pos) + self.seg.weight[3]

    def _run(self, x: Tensor, keys: Tensor, q_start: int, caches=None):
        """Blocks over new positions ``x`` ``[B, Tq, D]`` (absolute start ``q_start``) attending to
        every earlier key (``keys``: ``[B, Tk]`` valid keys, cached ones included)."""
        tq, tk = x.shape[1], keys.shape[1]
        causal = torch.arange(tk, device=x.device)[None, :] <= (q_start + torch.arange(tq, device=x.device))[:, None]
        allowed = causal[None] & keys[:, None, :]
        x = self.drop(x)
        new = []
        for i, blk in enumerate(self.blocks):
            x, kv = blk(x, allowed, None if caches is None else caches[i])
            new.append(kv)
        return self.ln(x), new

    def token_logprobs(self, prompts: SmallPrompt, ids: Tensor, mask: Tensor) -> Tensor:
        logits = self.logits(prompts, ids, mask)
        lp = torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None]).squeeze(-1)
        return lp * mask

    def logits(self, prompts: SmallPrompt, ids: Tensor, mask: Tensor) -> Tensor:
        """``[B, T, V]``: the next-token logits before each completion token (teacher forcing)."""
        pre, keep = self._prefix(prompts)
        bos = torch.full_like(ids[:, :1], self.vocab.stoi[BOS])
        inp = torch.cat([bos, ids[:, :-1]], 1)
        x = torch.cat([pre, self._completion_emb(inp, 0)], 1)
        keys = torch.cat([keep, torch.ones_like(mask)], 1)
        h, _ = self._run(x, keys, 0)
        return self.head(h[:, pre.shape[1]:])

    @torch.no_grad()
    def generate(self, prompts: SmallPrompt, max_new_tokens: int, temperature: float = 1.0,
                 greedy: bool = False) -> tuple[Tensor, Tensor]:
        max_new_tokens = min(max_new_tokens, self.max_completion)
        pre, keep = self._prefix(prompts)
        b, dev = pre.shape[0], pre.device
        eos = self.vocab.stoi[EOS]
        cur = torch.full((b, 1), self.vocab.stoi[BOS], dtype=torch.long, device=dev)
        x = torch.cat([pre, self._completion_emb(cur, 0)], 1)
        keys = torch.cat([keep, torch.ones(b, 1, dtype=torch.bool, device=dev)], 1)
        h, caches = self._run(x, keys, 0)
        out, done = [], torch.zeros(b, dtype=torch.bool, device=dev)
        mask = []
        for t in range(max_new_tokens):
            logits = self.head(h[:, -1]).float()
            if greedy or temperature <= 0:
                nxt = logits.argmax(-1)
            else:
                nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1).squeeze(-1)
            mask.append(~done)
            out.append(nxt)
            done = done | (nxt == eos)
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            keys = torch.cat([keys, torch.ones(b, 1, dtype=torch.bool, device=dev)], 1)
            h, caches = self._run(self._completion_emb(nxt[:, None], t + 1), keys, keys.shape[1] - 1, caches)
        return torch.stack(out, 1), torch.stack(mask, 1)

