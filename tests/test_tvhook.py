"""The torchvision import hook: timm, torchvision and torchmetrics import on CPU-only torch."""

import subprocess
import sys


def test_fresh_interpreter_imports_timm_through_the_hook():
    code = ("import ctr, torchvision, timm, torch; "
            "m = timm.create_model('resnet18', pretrained=False, num_classes=3).eval(); "
            "print(tuple(m(torch.zeros(1, 3, 32, 32)).shape))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("(1, 3)")


def test_hook_defines_only_missing_schemas():
    import torch
    import torchvision  # noqa: F401  (imported through the hook by now)

    from ctr import _tvhook

    # either the compiled ops loaded, or the hook defined the schemas: the ops exist either way
    assert _tvhook._op_exists("torchvision::nms") and _tvhook._op_exists("torchvision::qnms")
    first = _tvhook._state["library"] is not None
    assert _tvhook.define_missing_schemas() == first  # a second call defines nothing twice
    assert hasattr(torch.ops.torchvision, "nms")
    assert not _tvhook._op_exists("torchvision::not_an_op")
