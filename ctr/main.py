"""`make run`: the main job on the built-in default data.

Simulates the default visual-search advertising traffic (cached by its config's fingerprint),
prepares it, trains DIN and prints the metrics table: the production log's test split, the
uniform-random exposure log, and the ``true_ctr`` oracle beside each. Any Hydra override works:
``python -m ctr.main trainer.max_epochs=2``.
"""

import sys

from ctr.train import main as train_main

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "experiment=sim_din", *sys.argv[1:]]
    train_main()
