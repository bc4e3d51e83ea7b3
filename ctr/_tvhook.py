"""Make ``import torchvision`` (and so timm, lightning, torchmetrics) work on CPU-only torch.

The torchvision wheel that matches torch 2.13 is linked against CUDA. On a CPU build of torch its
compiled ops library fails to load, and torchvision's import then dies registering fake kernels for
``torchvision::nms`` / ``torchvision::qnms``: "operator torchvision::nms does not exist".

:func:`install` puts a finder in front of ``sys.meta_path`` that runs once, right before torchvision
is first imported: it tries to load torchvision's compiled ops the way torchvision itself would, and
only when that fails defines the two op *schemas* (no kernels), so the fake registrations succeed.
The compiled ops and ``torchvision.io`` stay unusable in that case; this project decodes images
with PIL. Where the compiled ops do load (a CUDA machine with a matching torch), nothing is defined.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_state = {"done": False, "library": None}


def _compiled_ops_path() -> Path | None:
    spec = importlib.util.find_spec("torchvision") if "torchvision" not in sys.modules else None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        for cand in Path(loc).glob("_C*.so"):
            return cand
        for cand in Path(loc).glob("_C*.pyd"):
            return cand
    return None


def define_missing_schemas() -> bool:
    """Define the torchvision op schemas if the compiled ops cannot load. Returns True if it did."""
    if _state["done"]:
        return _state["library"] is not None
    _state["done"] = True
    import torch

    path = _compiled_ops_path()
    if path is not None:
        try:
            torch.ops.load_library(str(path))
        except (OSError, RuntimeError):
            pass
    missing = [n for n in _SCHEMAS if not _op_exists(f"torchvision::{n}")]
    if not missing:
        return False
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        lib.define(_SCHEMAS[name])
    _state["library"] = lib  # keep alive: dropping the Library object would undefine the ops
    return True


def _op_exists(qualname: str) -> bool:
    import torch

    try:
        torch._C._dispatch_find_schema_or_throw(qualname, "")
        return True
    except RuntimeError:
        return False


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):  # noqa: D401 - importlib protocol
        if fullname == "torchvision":
            sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Finder)]
            define_missing_schemas()
        return None  # let the normal finders import it


def install() -> None:
    """Arrange for :func:`define_missing_schemas` to run before torchvision's first import."""
    if "torchvision" in sys.modules or _state["done"]:
        return
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
