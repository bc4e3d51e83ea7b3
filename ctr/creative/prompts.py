"""Prompts, chain-of-thought rationales, output parsing and GRPO rewards for creative selection.

Every selector (the small decoder, a transformers VLM) reads the same prompt text and is trained
on the same completions:

* prompt: ``query : <query> . title : <title> . which creative gets more clicks , A or B ?``
  (the two images come before it, A then B, in each model's own way);
* CoT target: ``<think> intent : deal . relevance : ... -> A . text : ... -> A . layout : ... -> = .
  subject : ... -> B . background : ... -> = . verdict : A on text , relevance . </think>
  <answer> A </answer>``. One clause per aspect of the paper's evaluation protocol (relevance to
  the query and title, text-in-image, layout, product subject, background): what each creative
  shows and which one the aspect favours under the known attractiveness model; the verdict names
  the logged winner and the aspects that favour it (largest first);
* answer-only target (SFT without reasoning): ``<answer> A </answer>``.

:func:`parse` reads a completion; :func:`rewards` scores completions for GRPO (a well-formed
``<think>…</think><answer>A|B</answer>`` and a correct answer, with configurable weights).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

QUESTION = "which creative gets more clicks , A or B ?"
_TIE = 0.05  # |utility difference| under this: the aspect is a tie ("=")

_WORDS = {
    "text": {"none": "no text", "banner": "sale banner", "dense": "dense text"},
    "clutter": {"none": "clean", "some": "some props", "heavy": "heavy clutter"},
    "framing": {"close": "close-up", "medium": "medium shot", "far": "small far"},
    "brightness": {"dark": "dark", "normal": "well lit", "bright": "overexposed"},
    "background": {"white": "white", "colour": "colour tint", "scene": "lifestyle scene"},
}

_STRICT = re.compile(r"^\s*<think>(?P<think>.*?)</think>\s*<answer>\s*(?P<ans>[AB])\s*</answer>\s*$", re.S | re.I)
_ANSWER = re.compile(r"<answer>\s*([AB])\s*</answer>", re.I)


PROMPT = "query : {} . title : {} . " + QUESTION  # the query, then the product title


def prompt_expr(query: str = "query", title: str = "title"):
    """The prompt (:data:`PROMPT`) of every row of a table with ``query`` and ``title`` columns."""
    import polars as pl

    return pl.format(PROMPT, pl.col(query), pl.col(title))


def _side(diff: float) -> str:
    return "A" if diff > _TIE else "B" if diff < -_TIE else "="


def rationale(a: dict, b: dict, ua: dict[str, float], ub: dict[str, float], intent: str,
              query_colour: str | None, label: str) -> str:
    """The CoT completion of one pair. ``a``/``b``: the creatives' attribute levels (``framing``,
    ``background``, ``brightness``, ``clutter``, ``text``, ``shown_colour``); ``ua``/``ub``: their
    per-aspect utilities (``relevance``, ``text``, ``layout``, ``subject``, ``background``);
    ``query_colour``: the colour the query names (None: no colour); ``label``: the winner."""
    d = {k: ua[k] - ub[k] for k in ua}
    q = f"query {query_colour}" if query_colour else "query no colour"
    parts = [
        f"intent : {intent} .",
        f"relevance : A shows {a['shown_colour']} , B shows {b['shown_colour']} ; {q} -> {_side(d['relevance'])} .",
        f"text : A {_WORDS['text'][a['text']]} , B {_WORDS['text'][b['text']]} -> {_side(d['text'])} .",
        f"layout : A {_WORDS['clutter'][a['clutter']]} , B {_WORDS['clutter'][b['clutter']]} -> {_side(d['layout'])} .",
        f"subject : A {_WORDS['framing'][a['framing']]} {_WORDS['brightness'][a['brightness']]} , "
        f"B {_WORDS['framing'][b['framing']]} {_WORDS['brightness'][b['brightness']]} -> {_side(d['subject'])} .",
        f"background : A {_WORDS['background'][a['background']]} , B {_WORDS['background'][b['background']]}"
        f" -> {_side(d['background'])} .",
    ]
    sign = 1.0 if label == "A" else -1.0
    favour = sorted((k for k in d if sign * d[k] > _TIE), key=lambda k: -sign * d[k])[:3]
    parts.append(f"verdict : {label} on {' , '.join(favour)} ." if favour else f"verdict : {label} overall .")
    return f"<think> {' '.join(parts)} </think> <answer> {label} </answer>"


def answer_only(label: str) -> str:
    return f"<answer> {label} </answer>"


def swap_text(text: str) -> str:
    """Exchange the roles of A and B in a completion (the pair shown in the other order)."""
    return re.sub(r"\b([AB])\b", lambda m: "B" if m.group(1) == "A" else "A", text)


@dataclass
class Parsed:
    well_formed: bool       # <think>...</think><answer>A|B</answer> and nothing else
    answer: str | None      # the last <answer> tag's letter (None: no answer)


def parse(text: str) -> Parsed:
    """Read a completion (tags and letters case-insensitive: some tokenizers lower-case)."""
    m = _STRICT.match(text)
    if m and m.group("think").strip():
        return Parsed(True, m.group("ans").upper())
    found = _ANSWER.findall(text)
    return Parsed(False, found[-1].upper() if found else None)


def rewards(texts: list[str], labels: list[str], w_format: float = 0.2, w_accuracy: float = 1.0
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(reward, well_formed, correct)`` per completion: ``w_format * well_formed + w_accuracy *
    correct``."""
    parsed = [parse(t) for t in texts]
    fmt = np.array([p.well_formed for p in parsed], dtype=np.float64)
    acc = np.array([p.answer == y for p, y in zip(parsed, labels)], dtype=np.float64)
    return w_format * fmt + w_accuracy * acc, fmt, acc
