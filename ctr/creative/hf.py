"""A real vision-language model as the creative selector, through ``transformers``.

:class:`HFSelector` loads any image-text-to-text model and its processor from a local folder
(``AutoModelForImageTextToText`` / ``AutoProcessor``, nothing is downloaded) and implements the
:class:`ctr.creative.selector.Policy` interface, so the same data, prompts, rewards and the SFT and
GRPO trainers drive it (``policy.kind=hf policy.path=/models/qwen2-vl-2b``). Each prompt is the
two creatives (A then B) followed by the shared prompt text, through the processor's chat
template when it has one, else as ``<image><image> prompt``.

The completion's tags (``<think>``, ``</think>``, ``<answer>``, ``</answer>``) are added to the
vocabulary (embeddings resized) when the tokenizer would split them, so that they decode intact.
Prompts are left padded; scoring passes the same position ids that ``generate`` derives from the
attention mask (models with multimodal rotary positions, Qwen2-VL style, derive their own), and
sampling uses a neutral generation config (no repetition penalty, n-gram blocking, top-k or top-p
from the checkpoint's defaults), so GRPO's log-probabilities are those of the distribution that
sampled the completions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ctr.creative.selector import Policy

TAGS = ["<think>", "</think>", "<answer>", "</answer>"]


@dataclass
class HFPrompt:
    texts: list[str]
    images: list[list]   # two PIL images per prompt

    def repeat(self, n: int) -> "HFPrompt":
        return HFPrompt([t for t in self.texts for _ in range(n)], [im for im in self.images for _ in range(n)])


class HFSelector(Policy):
    """A ``transformers`` vision-language model from ``path`` (see the module docstring).

    Args:
        path: a local folder with the model's weights, config and processor files.
        dtype: torch dtype name for the weights (``float32``, ``bfloat16``...).
        image_token: the placeholder for one image in a prompt without a chat template (default:
            the processor's ``image_token``).
    """

    needs = "pixels"

    def __init__(self, path: str, dtype: str = "float32", image_token: str | None = None):
        super().__init__()
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype))
        self.tok = self.processor.tokenizer
        self.tok.padding_side = "left"  # prompts end where the completion starts
        missing = [t for t in TAGS if len(self.tok.tokenize(t)) != 1]
        if missing:
            self.tok.add_tokens(missing)
            self.model.resize_token_embeddings(len(self.tok))
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.eos_id = self.tok.eos_token_id if self.tok.eos_token_id is not None else self.tok.sep_token_id
        if self.eos_id is None:
            raise ValueError(f"{path}: the tokenizer has neither an end-of-sequence nor a separator token")
        self.image_token = image_token or getattr(self.processor, "image_token", "<image>")
        text_cfg = getattr(self.model.config, "text_config", self.model.config)
        rope = getattr(text_cfg, "rope_scaling", None) or getattr(text_cfg, "rope_parameters", None) or {}
        self.own_positions = "mrope_section" in rope  # Qwen2-VL style: the model computes them
        self._images = None

    def bind(self, images) -> None:
        self._images = images.pixels

    def _pil(self, row: int):
        from PIL import Image
        return Image.fromarray(np.ascontiguousarray(np.asarray(self._images[row]).transpose(1, 2, 0)))

    def prompts(self, batch: dict) -> HFPrompt:
        if self._images is None:
            raise RuntimeError("bind() the creatives' images before use")
        texts = []
        for p in batch["prompt"]:
            if getattr(self.processor, "chat_template", None):
                msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": p}]}]
                texts.append(self.processor.apply_chat_template(msgs, add_generation_prompt=True))
            else:
                texts.append(f"{self.image_token}{self.image_token} {p}")
        images = [[self._pil(a), self._pil(b)] for a, b in zip(batch["a"].tolist(), batch["b"].tolist())]
        return HFPrompt(texts, images)

    def repeat(self, prompts: HFPrompt, n: int) -> HFPrompt:
        return prompts.repeat(n)

    def _inputs(self, prompts: HFPrompt) -> dict:
        enc = self.processor(text=prompts.texts, images=prompts.images, return_tensors="pt", padding="longest")
        dev = next(self.model.parameters()).device
        return {k: v.to(dev) if isinstance(v, Tensor) else v for k, v in enc.items()}

    def encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        rows = [self.tok(t, add_special_tokens=False)["input_ids"] + [self.eos_id] for t in texts]
        n = max(len(r) for r in rows)
        ids = torch.full((len(rows), n), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = torch.as_tensor(r), True
        dev = next(self.model.parameters()).device
        return ids.to(dev), mask.to(dev)

    def decode(self, ids: Tensor, mask: Tensor) -> list[str]:
        rows = [[int(i) for i, m in zip(r, k) if m and int(i) != self.eos_id] for r, k in zip(ids.tolist(), mask.tolist())]
        return self.tok.batch_decode(rows, skip_special_tokens=True)

    def token_logprobs(self, prompts: HFPrompt, ids: Tensor, mask: Tensor) -> Tensor:
        inp = self._inputs(prompts)
        p = inp["input_ids"].shape[1]
        inp["input_ids"] = torch.cat([inp["input_ids"], ids], 1)
        inp["attention_mask"] = torch.cat([inp["attention_mask"], mask.long()], 1)
        if not self.own_positions:  # as generate() does under left padding
            inp["position_ids"] = (inp["attention_mask"].cumsum(-1) - 1).clamp_min(0)
        logits = self.model(**inp).logits[:, p - 1: p - 1 + ids.shape[1]]
        lp = torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None]).squeeze(-1)
        return lp * mask

    def generation_config(self, max_new_tokens: int, temperature: float = 1.0, greedy: bool = False):
        """Plain sampling (or greedy decoding) from the model's distribution."""
        from transformers import GenerationConfig

        sample = not (greedy or temperature <= 0)
        return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample,
                                temperature=temperature if sample else 1.0, top_k=0, top_p=1.0,
                                repetition_penalty=1.0, no_repeat_ngram_size=0, num_beams=1,
                                eos_token_id=self.eos_id, pad_token_id=self.tok.pad_token_id)

    @torch.no_grad()
    def generate(self, prompts: HFPrompt, max_new_tokens: int, temperature: float = 1.0,
                 greedy: bool = False) -> tuple[Tensor, Tensor]:
        inp = self._inputs(prompts)
        p = inp["input_ids"].shape[1]
        out = self.model.generate(**inp, generation_config=self.generation_config(max_new_tokens, temperature, greedy)
                                  )[:, p:]
        is_eos = out == self.eos_id
        before = torch.cumsum(is_eos.long(), 1) - is_eos.long()  # eos tokens strictly before t
        return out, before == 0
