"""CTR prediction for multimodal e-commerce advertising: data contract, models, training."""

from ctr._tvhook import install as _install_torchvision_hook

_install_torchvision_hook()

__version__ = "0.1.0"
