"""Backbones: trunk/last-stage split, stride 1, and the weights they load (offline and local)."""

from __future__ import annotations

import pytest
import torch

from fgh_deploy import FghError, build_backbone, list_backbones
from fgh_deploy.backbones import lite0_keys_to_timm, lite0_weights_path
from fgh_deploy.images import list_images, load_image
from fgh_deploy.models import default_preprocess

# ImageNet-1k classes that are birds: cock..great grey owl, black grouse..black swan, white stork..albatross.
IMAGENET_BIRDS = set(range(7, 25)) | set(range(80, 101)) | set(range(127, 147))


@pytest.mark.parametrize("name", list_backbones())
def test_split_and_stride_one(name: str) -> None:
    backbone = build_backbone(name).eval()
    x = torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        fmap = backbone.trunk(x)
        out2 = backbone.copy_last_stage(stride=2)(fmap)
        out1 = backbone.copy_last_stage(stride=1)(fmap)
    assert fmap.shape[1:] == (backbone.info.trunk_channels, 4, 4)
    assert out2.shape[1:] == (backbone.info.out_channels, 2, 2)
    assert out1.shape[1:] == (backbone.info.out_channels, 4, 4)
    assert len(backbone.info.stage_channels) == len(backbone.last_stage)


@pytest.mark.parametrize("name", list_backbones())
def test_dilated_stride_one_keeps_the_stride_two_output(name: str) -> None:
    """At stride 1 the pretrained convs are dilated: every other position is the stride-2 output.

    Without dilation they would read a map at half the scale they were trained on (the public AGMH
    code), which halved the pooled features' retrieval quality on efficientnet_lite0.
    """
    torch.manual_seed(0)
    backbone = build_backbone(name).eval()
    fmap = torch.randn(2, backbone.info.trunk_channels, 6, 6)
    with torch.no_grad():
        out2 = backbone.copy_last_stage(stride=2)(fmap)
        out1 = backbone.copy_last_stage(stride=1)(fmap)
        undilated = backbone.copy_last_stage(stride=1, dilate=False)(fmap)
    # Which phase the stride-2 conv samples depends on its padding (symmetric: even; TF "same": odd).
    errors = [(out1[..., o::2, o::2] - out2).abs().max().item() for o in (0, 1)]
    scale = out2.abs().max().item()
    assert min(errors) <= 1e-4 * scale, errors
    assert min((undilated[..., o::2, o::2] - out2).abs().max().item() for o in (0, 1)) > 1e-2 * scale


def test_lite0_weights_map_strictly_onto_timm() -> None:
    import timm

    state = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    renamed = lite0_keys_to_timm(state)
    net = timm.create_model("tf_efficientnet_lite0")
    assert len(renamed) == len(state) == len(net.state_dict())
    net.load_state_dict(renamed, strict=True)  # raises on any missing or unexpected key


def test_lite0_mapping_refuses_unknown_keys() -> None:
    with pytest.raises(ValueError, match="unknown EfficientNet-Lite0 key"):
        lite0_keys_to_timm({"_blocks.99._expand_conv.weight": torch.zeros(1)})


def test_offline_lite0_weights_classify_cub_birds_as_birds(cub100) -> None:
    """The real check of the mapping: pretrained EfficientNet-Lite0 sees birds in CUB photos."""
    import timm

    net = timm.create_model("tf_efficientnet_lite0")
    net.load_state_dict(lite0_keys_to_timm(torch.load(lite0_weights_path(), weights_only=True)))
    net.eval()
    backbone = build_backbone("efficientnet_lite0", pretrained=True).eval()
    # The split backbone carries the same weights as the classifier it came from.
    torch.testing.assert_close(backbone.trunk.conv_stem.weight, net.conv_stem.weight)
    species = sorted(p for p in cub100.iterdir() if p.is_dir())[:16]
    preprocess = default_preprocess("efficientnet_lite0")
    batch = torch.stack([load_image(cub100 / s.name / list_images(s)[0], preprocess) for s in species])
    mean = torch.tensor(preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std).view(1, 3, 1, 1)
    with torch.no_grad():
        top1 = net((batch.float() / 255 - mean) / std).argmax(1).tolist()
    birds = sum(c in IMAGENET_BIRDS for c in top1)
    print(f"\n{birds}/16 CUB images classified as ImageNet birds: {top1}")
    assert birds >= 14


def test_local_weights_file_is_loaded(tmp_path) -> None:
    import torchvision

    reference = torchvision.models.resnet18()
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    backbone = build_backbone("resnet18", pretrained=path)
    torch.testing.assert_close(backbone.last_stage[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert "r18.pth" in backbone.weights_source and "sha256" in backbone.weights_source


def test_bad_weights_files_name_the_file(tmp_path) -> None:
    import torchvision

    with pytest.raises(FghError, match="missing.pth: weights file not found"):
        build_backbone("resnet18", pretrained=tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(FghError, match="garbage.pth: not a readable weights file"):
        build_backbone("resnet18", pretrained=garbage)
    other = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), other)
    with pytest.raises(FghError, match="r50.pth: does not match resnet18"):
        build_backbone("resnet18", pretrained=other)


def test_offline_download_failure_is_one_clear_error(monkeypatch, tmp_path) -> None:
    import urllib.error

    import torchvision.models._api as tv_api

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    with pytest.raises(FghError, match="resnet18: could not fetch torchvision ImageNet weights.*--weights PATH"):
        build_backbone("resnet18", pretrained=True)
