"""Every model's inference path exports to ONNX and runs the same in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import fgh_deploy as fgh
from fgh_deploy.engines.onnx_format import DIGEST_KEY, graph_digest
from fgh_deploy.export import ONNX_OPSET, export_onnx, read_onnx_metadata


@pytest.mark.parametrize("name", fgh.list_models())
def test_onnx_runtime_matches_pytorch(name: str, tmp_path, images: torch.Tensor) -> None:
    import onnxruntime as ort

    torch.manual_seed(0)
    model = fgh.build_model(name, 32, backbone="resnet18", input_size=64).eval()
    path = export_onnx(model, tmp_path / f"{name}.onnx", metadata={"model": name, "bits": 32})

    proto = onnx.load(str(path))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [ONNX_OPSET]
    assert not list(tmp_path.glob("*.data")), "the model must be one self-contained file"
    metadata = read_onnx_metadata(path)
    assert metadata.pop(DIGEST_KEY) == graph_digest(proto, metadata)  # sealed: weights and metadata
    assert metadata == {"model": name, "bits": 32}
    # Training-only weights (AGMH's SIEA) are not in the graph.
    exported = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    deployed = sum(p.numel() for p in model.parameters()) - sum(
        p.numel() for m in model.training_only_modules().values() for p in m.parameters())
    assert exported <= deployed + 16 * model.bits  # + folded constants (BN, scales)
    if model.training_only_modules():
        assert exported < sum(p.numel() for p in model.parameters())

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(uint8)"
    for batch in (images[:1], images):  # dynamic batch axis
        got = session.run(None, {"images": batch.numpy()})[0]
        with torch.no_grad():
            want = model(batch).numpy()
        max_diff = float(np.abs(got - want).max())
        agreement = float(((got >= 0) == (want >= 0)).mean())
        print(f"\n{name} batch {len(batch)}: max |Δ| {max_diff:.2e}, sign agreement {agreement:.2%}")
        assert got.shape == want.shape
        assert max_diff < 1e-4
        # A sign may only differ where the logit is numerically zero.
        assert ((got >= 0) == (want >= 0))[np.abs(want) > 1e-4].all()
