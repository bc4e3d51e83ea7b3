"""`make run`: the main job on the built-in default data: the three-stage pipeline.

Pretrains an image encoder (ImageNet EfficientNet-Lite0, contrastive views + image-title pairs) on
the simulator's catalogue, post-trains it on the simulated clicks, exports both item tables,
and trains the CTR model without and with them (and with the debiasing network), printing one
table beside the ``true_ctr`` oracle. See :mod:`ctr.pipeline`; its arguments work here too:
``python -m ctr.main --seeds 0 1 2``.
"""

from ctr.pipeline import main

if __name__ == "__main__":
    main()
