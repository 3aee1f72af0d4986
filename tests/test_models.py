"""The four hashing models: shapes, code split, batch independence, inference vs training paths."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fgh_deploy as fgh
from fgh_deploy.models import register_model
from fgh_deploy.models.semicon import code_split

MODELS = fgh.list_models()
SIZE = 64


def build(name: str, bits: int = 24, backbone: str = "resnet18", **options) -> fgh.HashModel:
    torch.manual_seed(0)
    return fgh.build_model(name, bits, backbone=backbone, input_size=SIZE, **options)


def test_registry_lists_the_four_models() -> None:
    assert MODELS == ["adsh", "a2net", "semicon", "agmh"]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("bits", [12, 16, 24, 32, 48, 64])
def test_codes_have_the_requested_length(name: str, bits: int, images: torch.Tensor) -> None:
    model = build(name, bits).eval()
    with torch.no_grad():
        codes = model(images)
    assert codes.shape == (len(images), bits)
    assert codes.dtype == torch.float32
    assert bool((codes.abs() <= 1).all())
    assert model.bits == bits and model.config.bits == bits


@pytest.mark.parametrize("backbone", ["resnet50", "efficientnet_lite0"])
@pytest.mark.parametrize("name", MODELS)
def test_every_backbone_builds_every_model(name: str, backbone: str) -> None:
    model = fgh.build_model(name, 32, backbone=backbone, input_size=SIZE).eval()
    with torch.no_grad():
        codes = model(torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8))
    assert codes.shape == (1, 32)


@pytest.mark.parametrize("bits", range(6, 257))
def test_semicon_split_sums_to_bits(bits: int) -> None:
    global_bits, part_bits = code_split(bits)
    assert global_bits + 3 * part_bits == bits
    assert part_bits == bits // 6 >= 1
    assert global_bits >= part_bits


def test_semicon_split_matches_the_published_lengths() -> None:
    # models.md §2: 12 → 6+2+2+2, 24 → 12+3×4, 32 → 17+3×5, 48 → 24+3×8, 16 → 10+3×2, 64 → 34+3×10.
    published = {12: (6, 2), 24: (12, 4), 32: (17, 5), 48: (24, 8), 16: (10, 2), 64: (34, 10)}
    assert {k: code_split(k) for k in published} == published


def test_semicon_refuses_fewer_than_six_bits() -> None:
    with pytest.raises(ValueError, match="at least 6 bits"):
        build("semicon", 5)


@pytest.mark.parametrize("name", MODELS)
def test_a_code_does_not_depend_on_the_rest_of_the_batch(name: str, images: torch.Tensor) -> None:
    model = build(name).eval()
    with torch.no_grad():
        batched = model(images)
        alone = torch.cat([model(images[i : i + 1]) for i in range(len(images))])
        reordered = model(images.flip(0)).flip(0)
    torch.testing.assert_close(alone, batched, atol=2e-5, rtol=0)
    torch.testing.assert_close(reordered, batched, atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_uint8_and_float_pixels_give_the_same_codes(name: str, images: torch.Tensor) -> None:
    model = build(name).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images), model(images.float()))


@pytest.mark.parametrize("name", MODELS)
def test_training_only_modules_are_not_reached_by_forward(name: str, images: torch.Tensor) -> None:
    model = build(name)
    calls: list[str] = []
    for prefix, module in model.training_only_modules().items():
        for sub_name, sub in module.named_modules():
            sub.register_forward_hook(lambda *_, n=f"{prefix}.{sub_name}": calls.append(n))
    with torch.no_grad():
        model.eval()(images)
    assert calls == []
    extras = model.train().forward_train(images)
    assert extras["codes"].shape == (len(images), 24)
    if model.training_only_modules():
        assert calls, "forward_train must use the training-only modules"


def test_a2net_training_outputs_the_tied_reconstruction(images: torch.Tensor) -> None:
    model = build("a2net", num_parts=3).train()
    out = model.forward_train(images)
    feat_dim = 4 * 512  # (M + 1) parts × resnet18 channels
    assert out["features"].shape == out["reconstruction"].shape == (len(images), feat_dim)
    torch.testing.assert_close(out["reconstruction"], out["codes"] @ model.hash.weight)


def test_agmh_training_outputs_one_attention_map_per_branch(images: torch.Tensor) -> None:
    out = build("agmh").train().forward_train(images)
    # stride-1 last stage: 64 px → 4×4 maps (stride 16).
    assert out["attention"].shape == (len(images), 6, 512, SIZE // 16, SIZE // 16)


@pytest.mark.parametrize("train_mode", [False, True])
def test_agmh_fused_descriptor_equals_six_branches(train_mode: bool, images: torch.Tensor) -> None:
    model = build("agmh")
    with torch.no_grad():
        for p in model.descriptor_norm.parameters():  # non-trivial BN so the split is really tested
            p.uniform_(0.5, 1.5)
        model.descriptor_norm.running_mean.uniform_(-0.2, 0.2)
        model.descriptor_norm.running_var.uniform_(0.5, 2.0)
    model.train(train_mode)
    branches = model.descriptor_branches()
    with torch.no_grad():
        x = model.normalize(images)
        stage = model.last_stage(model.trunk(x))
        separate = torch.cat([branch(stage) for branch in branches], dim=1)
        fused = model.descriptors(x)
    assert len(branches) == 6
    torch.testing.assert_close(fused, separate, atol=1e-5, rtol=1e-5)


def test_semicon_loads_every_weight_of_the_copied_stages(tmp_path) -> None:
    import torchvision

    torch.manual_seed(1)
    reference = torchvision.models.resnet18()
    weights = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), weights)
    model = fgh.build_model("semicon", 24, backbone="resnet18", pretrained=weights, input_size=SIZE)
    expected = reference.layer4.state_dict()
    for stage in (model.refine_global, model.refine_local):
        for key, value in stage.blocks.state_dict().items():
            torch.testing.assert_close(value, expected[key], msg=f"{key} not loaded")
    buggy = fgh.build_model("semicon", 24, backbone="resnet18", pretrained=weights, input_size=SIZE,
                            reproduce_official_init=True)
    # resnet18's layer4 has two blocks: the bug re-initialises the last one.
    assert not torch.equal(buggy.refine_global.blocks[1].conv1.weight, reference.layer4[1].conv1.weight)
    assert torch.equal(buggy.refine_global.blocks[0].conv1.weight, reference.layer4[0].conv1.weight)


def test_agmh_runs_its_last_stage_at_stride_one(images: torch.Tensor) -> None:
    model = build("agmh").eval()
    with torch.no_grad():
        fmap = model.descriptors(model.normalize(images))
    assert fmap.shape[-2:] == (SIZE // 16, SIZE // 16)


def test_unknown_names_and_options_are_refused() -> None:
    with pytest.raises(ValueError, match="choose from adsh, a2net, semicon, agmh"):
        fgh.build_model("resnet", 12)
    with pytest.raises(ValueError, match="unknown backbone"):
        fgh.build_model("adsh", 12, backbone="vgg16")
    with pytest.raises(ValueError, match="unknown option.*num_part"):
        fgh.build_model("a2net", 12, backbone="resnet18", num_part=4)


def test_duplicate_registration_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("adsh", options=object, summary="", paper="")(nn.Module)


def test_options_are_recorded_in_full() -> None:
    model = build("a2net")
    assert model.config.options == {"num_parts": 4, "normalize_parts": False}
