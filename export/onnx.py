"""PyTorch → ONNX for the inference path: uint8 images in, (B, bits) tanh codes out.

Opset 20: the newest opset both JetPack 6's TensorRT 10.3 and TensorRT 11 parse, and ONNX
Runtime runs; the dynamo exporter (the default since torch 2.9) supports 18 and up.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fgh_deploy.config import parse_json_object
from fgh_deploy.errors import FghError
from fgh_deploy.utils import display_path

log = logging.getLogger(__name__)

ONNX_OPSET = 20
INPUT_NAME = "images"
OUTPUT_NAME = "codes"
METADATA_KEY = "fgh"
#: Largest batch an exported graph (and a TensorRT profile) takes.
MAX_BATCH = 4096
#: The metadata field that ties the metadata to the graph it describes (see :func:`graph_digest`).
DIGEST_KEY = "integrity_sha256"


def export_onnx(model: torch.nn.Module, path: str | os.PathLike, *, opset: int = ONNX_OPSET,
                metadata: dict[str, Any] | None = None, check: bool = True) -> Path:
    """Trace ``model.forward`` (eval mode) to one self-contained ONNX file with a dynamic batch axis.

    Args:
        model: a :class:`~fgh_deploy.models.HashModel`; its ``preprocess.input_size`` fixes H and W.
        path: output ``.onnx`` file.
        opset: ONNX opset (default 20, see the module docstring).
        metadata: JSON-serialisable dict stored under the ``fgh`` key of the model's metadata_props,
            sealed with the :func:`graph_digest` of the exported graph under ``integrity_sha256``.
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
        sealed = {**metadata, DIGEST_KEY: graph_digest(proto, metadata)}
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(sealed, sort_keys=True)
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


def graph_digest(proto: Any, metadata: dict[str, Any]) -> str:
    """sha256 over fgh's metadata and everything the graph computes with.

    Covers the metadata (all but its ``integrity_sha256`` field), every initializer's name, dtype,
    shape and values, and the rest of the model (nodes with their attributes and constants,
    inputs, outputs, opsets, functions) with its metadata_props left out. Initializers are hashed
    as numpy arrays, so the digest does not depend on how a tensor is stored (raw bytes or typed
    fields); the rest is protobuf's deterministic serialisation, whose bytes are fixed by the
    schema's field numbers (ONNX has no map fields), not by the protobuf or onnx version.

    The digest detects an ONNX file or its metadata changed after export; anyone with fgh can
    recompute it, so it is not a signature.

    Raises:
        FghError: an initializer stored outside the file (fgh exports are self-contained).
    """
    import onnx
    from onnx import numpy_helper

    digest = hashlib.sha256()
    fields = {key: value for key, value in metadata.items() if key != DIGEST_KEY}
    digest.update(json.dumps(fields, sort_keys=True).encode())
    for tensor in sorted(proto.graph.initializer, key=lambda t: t.name):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise FghError(f"initializer {tensor.name!r} is stored outside the file; fgh exports are self-contained")
        array = numpy_helper.to_array(tensor)
        digest.update(f"{len(tensor.name)}:{tensor.name}|{array.dtype.str}|{array.shape}|".encode())
        if array.dtype.kind == "O":  # string tensors: their bytes, not the object pointers
            digest.update(json.dumps([str(v) for v in array.ravel()]).encode())
        else:
            digest.update(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes())
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(proto)
    skeleton.graph.ClearField("initializer")
    skeleton.ClearField("metadata_props")
    digest.update(skeleton.SerializeToString(deterministic=True))
    return digest.hexdigest()


def metadata_of(proto: Any) -> dict[str, Any] | None:
    """The ``fgh`` metadata dict of a loaded model (None when it has none).

    Raises:
        FghError: the entry is not a JSON object (or is nested implausibly deep); the caller names the file.
    """
    for entry in proto.metadata_props:
        if entry.key == METADATA_KEY:
            return parse_json_object(entry.value, "fgh metadata")
    return None


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``fgh`` metadata dict stored by :func:`export_onnx` ({} if absent).

    Raises:
        FghError: the metadata entry is not a JSON object.
    """
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    try:
        return metadata_of(proto) or {}
    except FghError as exc:
        raise FghError(f"{display_path(path)}: {exc}") from None
