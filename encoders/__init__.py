"""Image and text encoders for the CTR stage (contrastive pretraining and click post-training)."""

from ctr._tvhook import install as _install_torchvision_hook

_install_torchvision_hook()
