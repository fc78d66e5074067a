"""``model.onnx`` of an export, checked with ONNX Runtime against PyTorch.

``--onnx`` adds ``model.onnx`` (torch's dynamo exporter, the default since torch 2.9; a dynamic
batch axis) and checks it with ONNX Runtime against the timm model on sample inputs of other
batch sizes than the traced one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from medscale.errors import ConfigError

__all__ = ["ONNX_TOLERANCE", "OnnxParityError", "export_onnx", "require_onnx"]

log = logging.getLogger("medscale.checkpoint.export")

ONNX_TOLERANCE = 1e-4
"""Largest absolute difference of logits allowed between ONNX Runtime and PyTorch."""


class OnnxParityError(RuntimeError):
    """ONNX Runtime's outputs differ from PyTorch's by more than the tolerance."""


def require_onnx() -> None:
    missing = []
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ConfigError(f"--onnx needs {', '.join(missing)}: pip install 'medscale[export]' "
                          "(onnx, onnxscript, onnxruntime)")


@torch.no_grad()
def export_onnx(model: nn.Module, path: str | Path, *, channels: int, image_size: int,
                tolerance: float = ONNX_TOLERANCE) -> tuple[float, int]:
    """Write `model` as ONNX with a dynamic batch axis and compare ONNX Runtime with PyTorch on
    seeded inputs of batch 1 and 3 (the graph is traced at batch 2). Returns the largest absolute
    difference of the outputs and the opset.

    Raises:
        OnnxParityError: the difference exceeds `tolerance` (the ONNX files are removed).
    """
    import numpy as np
    import onnx
    import onnxruntime as ort

    path = Path(path)
    model = model.eval()
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, channels, image_size, image_size, generator=g)
    program = torch.onnx.export(model, (sample,), input_names=["image"], output_names=["logits"],
                                dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    program.save(str(path))  # initializers inside the file below 2 GB, beside it (model.onnx.data) above
    opset = next((o.version for o in onnx.load(str(path), load_external_data=False).opset_import
                  if o.domain in ("", "ai.onnx")), 0)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diff = 0.0
    for batch in (1, 3):
        x = torch.randn(batch, channels, image_size, image_size, generator=g)
        want = model(x).float().numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        if got.shape != want.shape:
            raise OnnxParityError(f"ONNX Runtime gave outputs of shape {got.shape} for batch {batch}, PyTorch {want.shape}")
        diff = max(diff, float(np.abs(got - want).max()))
    del session
    if not diff <= tolerance:
        path.unlink(missing_ok=True)
        data.unlink(missing_ok=True)
        raise OnnxParityError(f"ONNX Runtime's logits differ from PyTorch's by up to {diff:.3g} (tolerance "
                              f"{tolerance:g}) on seeded inputs of batch 1 and 3; {path} was removed")
    log.info("wrote %s (opset %d): ONNX Runtime within %.3g of PyTorch (tolerance %g)", path, opset, diff, tolerance)
    return diff, opset
