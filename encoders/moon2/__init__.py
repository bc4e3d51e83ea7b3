"""MOON2.0 (CVPR 2026) at this project's scale: a multimodal product encoder with a fusion
transformer and modality-driven mixture of experts, dual-level alignment, dynamic sample
filtering, image-text co-augmentation, and a multi-direction retrieval benchmark.

Modules: :mod:`~encoders.moon2.fusion` (encoder, MoE, objective weights),
:mod:`~encoders.moon2.objectives` (losses, filtering), :mod:`~encoders.moon2.augment`
(co-augmentation), :mod:`~encoders.moon2.features` (products, token caches),
:mod:`~encoders.moon2.data` / :mod:`~encoders.moon2.datamodule` (triples),
:mod:`~encoders.moon2.module` (Lightning), :mod:`~encoders.moon2.benchmark`,
:mod:`~encoders.moon2.train` (``python -m encoders.moon2.train experiment=moon2_full``).
"""
