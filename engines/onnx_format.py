"""The fgh ONNX file format: the graph's I/O contract and the ``fgh`` metadata that travels in it.

The exporter (:mod:`fgh_deploy.export.onnx`) writes it and the runtime (:mod:`.onnx_engine`)
reads it, so both use this module; ``onnx`` is imported only by the functions that need it.

An exported graph takes uint8 images ``images`` (B, 3, S, S) and gives float codes ``codes``
(B, bits). Its ``metadata_props`` hold one ``fgh`` entry: a JSON object with the model, bits,
preprocessing and fingerprint, sealed by ``integrity_sha256`` (:func:`graph_digest`) over the
metadata and the graph's weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from fgh_deploy.config import HashConfig, PreprocessConfig, parse_json_object
from fgh_deploy.errors import FghError
from fgh_deploy.utils import display_path, terminal_safe

INPUT_NAME = "images"
OUTPUT_NAME = "codes"
METADATA_KEY = "fgh"
#: Largest batch an exported graph (and a TensorRT profile) takes.
MAX_BATCH = 4096
#: The metadata field that ties the metadata to the graph it describes (see :func:`graph_digest`).
DIGEST_KEY = "integrity_sha256"


def seal_metadata(proto: Any, metadata: dict[str, Any]) -> None:
    """Store ``metadata`` under the ``fgh`` key of ``proto``'s metadata_props, sealed with its :func:`graph_digest`.

    Call on the finished graph: the digest covers its weights and nodes as they are now.
    """
    sealed = {**metadata, DIGEST_KEY: graph_digest(proto, metadata)}
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(sealed, sort_keys=True)


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
    """The ``fgh`` metadata dict stored by :func:`fgh_deploy.export.onnx.export_onnx` ({} if absent).

    Raises:
        FghError: the metadata entry is not a JSON object.
    """
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    try:
        return metadata_of(proto) or {}
    except FghError as exc:
        raise FghError(f"{display_path(path)}: {exc}") from None


def read_verified_model(path: Path) -> tuple[bytes, dict[str, Any], PreprocessConfig]:
    """The bytes of an exported ONNX file, its fgh metadata and preprocessing, once all are checked.

    Checks, in order: a readable ONNX model; fgh metadata with the fields an engine needs; the
    metadata's ``integrity_sha256`` against the graph's weights and the metadata themselves
    (:func:`graph_digest`); the fields' types and bounds; the graph's one uint8
    (B, 3, S, S) input and (B, bits) output against the metadata. The bytes returned are the ones
    checked, so the session runs exactly what was verified.

    Raises:
        FghError: one line naming the file and what is wrong.
    """
    import onnx
    from google.protobuf.message import DecodeError

    shown = display_path(path)
    try:
        data = path.read_bytes()
        proto = onnx.load_model_from_string(data)
    except OSError as exc:
        raise FghError(f"{shown}: cannot read it ({terminal_safe(exc.strerror or str(exc))})") from None
    except (DecodeError, ValueError, RuntimeError) as exc:  # protobuf's parse errors, by implementation
        reason = terminal_safe(" ".join(str(exc).split()))[:160]
        raise FghError(f"{shown}: not a readable ONNX model ({exc.__class__.__name__}: {reason})") from None
    try:
        meta = metadata_of(proto)
        if meta is None:
            raise FghError("no fgh metadata; export it with fgh export")
        missing = [key for key in ("model", "preprocess", "fingerprint") if key not in meta]
        if missing:
            raise FghError(f"no fgh metadata ({', '.join(map(repr, missing))} missing); export it with fgh export")
        if DIGEST_KEY not in meta:
            raise FghError("exported by an older fgh without a weights digest; re-export it with fgh export")
        if meta[DIGEST_KEY] != graph_digest(proto, meta):
            raise FghError("the graph's weights or its fgh metadata do not match the recorded digest "
                           "(modified after export?); re-export it with fgh export")
        config = HashConfig.from_dict(meta["model"], "model")
        preprocess = PreprocessConfig.from_dict(meta["preprocess"])
        if not isinstance(meta["fingerprint"], str) or not meta["fingerprint"]:
            raise FghError("bad fingerprint: expected a non-empty string")
        if meta.get("bits", config.bits) != config.bits:
            raise FghError(f"bad bits: {terminal_safe(repr(meta['bits']))[:40]}, but model.bits is {config.bits}")
        if meta.get("precision", "fp32") not in ("fp32", "fp16"):
            raise FghError("bad precision: expected fp32 or fp16")
        _check_graph_io(proto.graph, preprocess.input_size, config.bits)
    except FghError as exc:
        raise FghError(f"{shown}: {exc}") from None
    return data, meta, preprocess


def _check_graph_io(graph: Any, size: int, bits: int) -> None:
    """The graph takes uint8 (B, 3, size, size) and gives (B, bits), as its metadata says."""
    import onnx

    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise FghError(f"the graph has {len(inputs)} inputs and {len(graph.output)} outputs; fgh exports have one "
                       f"of each")

    def dims(value: Any) -> tuple[int | str, ...]:
        shape = value.type.tensor_type.shape.dim
        return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape)

    in_dims, out_dims = dims(inputs[0]), dims(graph.output[0])
    if inputs[0].type.tensor_type.elem_type != onnx.TensorProto.UINT8:
        raise FghError("the graph's input is not uint8 images; re-export it with fgh export")
    if len(in_dims) != 4 or in_dims[1:] != (3, size, size):
        raise FghError(f"the graph takes images of shape {in_dims} but its metadata says input_size {size}; "
                       f"re-export it with fgh export")
    if len(out_dims) != 2 or out_dims[1] != bits:
        raise FghError(f"the graph gives codes of shape {out_dims} but its metadata says {bits} bits; "
                       f"re-export it with fgh export")
