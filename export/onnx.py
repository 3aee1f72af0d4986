"""PyTorch → ONNX for the inference path: uint8 images in, (B, bits) tanh codes out.

Opset 20: the newest opset both JetPack 6's TensorRT 10.3 and TensorRT 11 parse, and ONNX
Runtime runs; the dynamo exporter (the default since torch 2.9) supports 18 and up.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fgh_deploy.engines.onnx_format import INPUT_NAME, MAX_BATCH, OUTPUT_NAME, seal_metadata

log = logging.getLogger(__name__)

ONNX_OPSET = 20


def export_onnx(model: torch.nn.Module, path: str | os.PathLike, *, opset: int = ONNX_OPSET,
                metadata: dict[str, Any] | None = None, check: bool = True) -> Path:
    """Trace ``model.forward`` (eval mode) to one self-contained ONNX file with a dynamic batch axis.

    Args:
        model: a :class:`~fgh_deploy.models.HashModel`; its ``preprocess.input_size`` fixes H and W.
        path: output ``.onnx`` file.
        opset: ONNX opset (default 20, see the module docstring).
        metadata: JSON-serialisable dict stored under the ``fgh`` key of the model's metadata_props,
            sealed with the digest of the exported graph under ``integrity_sha256``
            (:func:`fgh_deploy.engines.onnx_format.seal_metadata`).
        check: run ``onnx.checker`` with ``full_check=True`` on the result.

    Returns:
        The path written.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    size = model.preprocess.input_size
    device = next(model.parameters()).device
    # A batch of 2, not 1: the exporter specialises a size-1 example dimension.
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8, device=device)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.no_grad():
        program = torch.onnx.export(
            model, (example,), dynamo=True, opset_version=opset, external_data=False,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes={"images": {0: batch}}, verbose=False,
        )
    proto = program.model_proto
    if metadata is not None:
        seal_metadata(proto, metadata)
    tmp = path.with_name(f".{path.name}.tmp")
    onnx.save_model(proto, tmp)
    os.replace(tmp, path)
    if check:
        onnx.checker.check_model(str(path), full_check=True)
    return path


class HalfPrecisionModel(nn.Module):
    """The FP16 inference graph of a hash model, with FP32 islands.

    uint8 in → FP32 normalisation → FP16 network → FP32 codes out. The models already keep their
    numerically fragile parts in FP32 with explicit casts (SEMICON's mask statistics, the channel
    interaction's signed-sqrt softmax, A²-Net's L2 normalisation), and those casts land in the
    graph: exactly what a strongly typed TensorRT 11 build needs.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).eval().half()
        self.model.normalize.float()
        self.preprocess = model.preprocess

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.model.normalize(images).half()
        return self.model.codes(self.model.encode_features(x)).float()
