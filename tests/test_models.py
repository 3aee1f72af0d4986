"""The four hashing models: shapes, code split, batch independence, inference vs training paths."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fgh_deploy as fgh
from fgh_deploy.errors import ConfigError
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
    with pytest.raises(ConfigError, match="at least 6 bits"):
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
        fmap = model.trunk(model.normalize(images))
        stage = model.last_stage(fmap)
        separate = torch.cat([branch(stage) for branch in branches], dim=1)
        fused = model.descriptors(fmap)
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
        fmap = model.descriptors(model.trunk(model.normalize(images)))
    assert fmap.shape[-2:] == (SIZE // 16, SIZE // 16)


def test_unknown_names_and_options_are_refused() -> None:
    # ConfigError: an FghError (one line at the CLI) and a ValueError (what Python callers catch).
    assert issubclass(ConfigError, fgh.FghError) and issubclass(ConfigError, ValueError)
    with pytest.raises(ConfigError, match="choose from adsh, a2net, semicon, agmh"):
        fgh.build_model("resnet", 12)
    with pytest.raises(ConfigError, match="unknown backbone"):
        fgh.build_model("adsh", 12, backbone="vgg16")
    with pytest.raises(ConfigError, match="unknown backbone"):
        fgh.build_backbone("vgg16")
    with pytest.raises(ConfigError, match="num_parts must be in 1..256"):
        fgh.build_model("a2net", 12, backbone="resnet18", num_parts=0)
    with pytest.raises(ConfigError, match="unknown option.*num_part"):
        fgh.build_model("a2net", 12, backbone="resnet18", num_part=4)


def test_duplicate_registration_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("adsh", options=object, summary="", paper="")(nn.Module)


def test_options_are_recorded_in_full() -> None:
    model = build("a2net")
    assert model.config.options == {"num_parts": 4, "normalize_parts": False}


# --- initialisation: new layers start where the pretrained path keeps working ----------------

from fgh_deploy.models.agmh import SIEA  # noqa: E402
from fgh_deploy.models.layers import AttentionHead, ChannelInteraction  # noqa: E402

BACKBONES = fgh.list_backbones()


def _reference_interaction(block: ChannelInteraction, x: torch.Tensor) -> torch.Tensor:
    """SEMICON §3.3 written out index by index: step 1 within the h groups of d channels (scale
    d^-½), step 2 across the groups for each within-group index j (scale h^-½), both as gated
    residuals in the input's channel order."""
    b, c, hh, ww = x.shape
    heads, dim, n = block.heads, block.head_dim, hh * ww

    def mix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        a = torch.einsum("...in,...jn->...ij", q, k) * scale
        a = torch.sign(a) * torch.sqrt(a.abs() + 1e-5)
        return torch.einsum("...ij,...jn->...in", a.softmax(-1), v)

    qkv = block.qkv_within(x).reshape(b, 3, heads, dim, n)
    within = mix(qkv[:, 0], qkv[:, 1], qkv[:, 2], dim ** -0.5)  # (b, heads, dim, n); channel i·d + j
    x1 = x + block.gate_within.view(1, c, 1, 1) * within.reshape(b, c, hh, ww)
    z = torch.relu(block.norm(x1)).reshape(b, heads, dim, n)
    grouped = torch.stack([z[:, i, j] for j in range(dim) for i in range(heads)], dim=1)  # channel j·h + i
    qkv = block.qkv_across(grouped.reshape(b, c, hh, ww)).reshape(b, 3, dim, heads, n)
    across = mix(qkv[:, 0], qkv[:, 1], qkv[:, 2], heads ** -0.5)  # (b, dim, heads, n)
    back = torch.stack([across[:, j, i] for i in range(heads) for j in range(dim)], dim=1)  # channel i·d + j
    return x1 + block.gate_across.view(1, c, 1, 1) * back.reshape(b, c, hh, ww)


@pytest.mark.parametrize("channels", [320, 1024])
@pytest.mark.parametrize("train_mode", [False, True])
def test_channel_interaction_is_the_identity_at_initialisation(channels: int, train_mode: bool) -> None:
    # A pretrained layer after the block must read exactly the channels it was trained on.
    torch.manual_seed(0)
    block = ChannelInteraction(channels).train(train_mode)
    x = torch.randn(2, channels, 5, 5)
    with torch.no_grad():
        assert torch.equal(block(x), x)


@pytest.mark.parametrize("channels", [320, 1024])
def test_channel_interaction_follows_the_paper_equations(channels: int) -> None:
    torch.manual_seed(0)
    block = ChannelInteraction(channels).eval()
    with torch.no_grad():
        block.gate_within.uniform_(0.5, 1.5)
        block.gate_across.uniform_(0.5, 1.5)
        block.norm.running_mean.uniform_(-0.5, 0.5)
        block.norm.running_var.uniform_(0.5, 2.0)
        x = torch.randn(2, channels, 3, 4)
        torch.testing.assert_close(block(x), _reference_interaction(block, x), atol=1e-4, rtol=1e-4)


def test_new_layers_start_as_the_public_code_initialises_them() -> None:
    torch.manual_seed(0)
    block = ChannelInteraction(2048)
    for conv in (block.qkv_within, block.qkv_across):
        fan_out = conv.out_channels  # torch's kaiming fan-out of a (grouped) 1×1 conv, as in the public code
        assert conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.03)
    head = AttentionHead(64, maps=4)
    assert head.conv.weight.std().item() == pytest.approx((2 / 4) ** 0.5, rel=0.15)
    agmh = build("agmh", backbone="resnet50")
    # One branch's fan-out (512), not the fused conv's 3072 outputs.
    assert agmh.descriptor.weight.std().item() == pytest.approx((2 / 512) ** 0.5, rel=0.02)


def test_siea_has_biases_only_on_its_input_projection() -> None:
    siea = SIEA(64, memory=16)
    with_bias = {name for name, m in siea.named_modules() if getattr(m, "bias", None) is not None
                 and not isinstance(m, nn.BatchNorm2d)}
    assert with_bias == {"proj_in"}


def test_attention_maps_start_as_ones(images: torch.Tensor) -> None:
    head = AttentionHead(8, maps=3)
    for mode in (False, True):
        with torch.no_grad():
            assert torch.equal(head.train(mode)(torch.randn(2, 8, 4, 4)), torch.ones(2, 3, 4, 4))


def _shared_backbone_models(backbone: str, tmp_path) -> dict[str, fgh.HashModel]:
    """Every model built on the same (random) backbone weights, as a pretrained file would give."""
    torch.manual_seed(3)
    weights = tmp_path / f"{backbone}.pth"
    net = fgh.build_backbone(backbone)
    if backbone == "efficientnet_lite0":
        import timm

        state = timm.create_model("tf_efficientnet_lite0").state_dict()
    else:
        import torchvision

        state = getattr(torchvision.models, backbone)().state_dict()
    torch.save(state, weights)
    del net
    return {name: fgh.build_model(name, 24, backbone=backbone, pretrained=weights, input_size=SIZE)
            for name in MODELS}


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("train_mode", [False, True])
def test_global_branch_starts_as_the_pretrained_backbone(backbone: str, train_mode: bool, images: torch.Tensor,
                                                         tmp_path) -> None:
    # In float64: pooling through attention maps of ones sums in another order than global pooling,
    # and in float32 that order alone (threads, SIMD width) moves the result by up to 5e-5.
    models = {name: model.double() for name, model in _shared_backbone_models(backbone, tmp_path).items()}
    adsh = models["adsh"].train(train_mode)
    with torch.no_grad():
        fmap = adsh.trunk(adsh.normalize(images).double())
        reference = adsh.global_features(fmap)
        for name in ("semicon", "a2net"):
            model = models[name].train(train_mode)
            torch.testing.assert_close(model.global_features(fmap), reference, msg=name)
            # The parts start as the whole map too (attention maps of ones).
            if name == "a2net":
                parts = model.features(fmap)[:, :-reference.shape[1]].reshape(len(images), -1, reference.shape[1])
            else:
                parts = model.features(fmap)[1].transpose(0, 1)
            torch.testing.assert_close(parts, reference[:, None].expand_as(parts), msg=f"{name} parts")


@pytest.mark.parametrize("backbone", BACKBONES)
def test_parameter_groups_split_pretrained_from_new_layers(backbone: str, tmp_path) -> None:
    models = _shared_backbone_models(backbone, tmp_path)
    weights = torch.load(tmp_path / f"{backbone}.pth", weights_only=True)
    loaded = {tuple(t.shape): t for t in weights.values()}
    for name, model in models.items():
        groups = model.parameter_groups()
        assert set(groups) == {"pretrained", "new", "hash"}
        ids = [id(p) for group in groups.values() for p in group]
        assert sorted(ids) == sorted(id(p) for p in model.parameters()), f"{name}: not a partition"
        names = {id(p): n for n, p in model.named_parameters()}
        new = {names[id(p)] for p in groups["new"]}
        hash_names = {names[id(p)] for p in groups["hash"]}
        assert hash_names and all(n.startswith("hash") for n in hash_names)
        assert not any(n.startswith("hash") for n in new) and not any(n.startswith("trunk") for n in new)
        # Every pretrained parameter holds a tensor of the weights file (the copied stages keep theirs).
        for p in groups["pretrained"]:
            assert any(torch.equal(p, t) for t in weights.values() if t.shape == p.shape), names[id(p)]
        assert loaded  # the file is not empty


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0"])
def test_hash_rate_scale_is_feature_width_over_fan_in(backbone: str) -> None:
    """Adam moves a linear layer's output ∝ its fan-in: wide hash layers get a proportionally lower rate."""
    width = fgh.build_backbone(backbone).info.out_channels
    expected = {"adsh": 1.0, "semicon": 1.0, "a2net": 1 / 5}
    for name, scale in expected.items():
        model = fgh.build_model(name, 32, backbone=backbone, input_size=SIZE)
        assert model.hash_rate_scale() == pytest.approx(scale), name
    agmh = fgh.build_model("agmh", 32, backbone=backbone, input_size=SIZE)
    assert agmh.hash_rate_scale() == pytest.approx(min(1.0, width / agmh.hash.in_features))


def test_real_images_global_branch_keeps_the_pretrained_retrieval_quality(cub100) -> None:
    """At initialisation every model's global branch retrieves as well as the pretrained features.

    Cosine k-NN mAP (leave one out) over 25 images of each of 20 cub100 species: within one point
    of ADSH's pooled features. SEMICON's channel interaction in the public layout fell 7.7 points
    below (0.599 vs 0.677), AGMH's undilated stride-1 stage 27 points (0.41).
    """
    from fgh_deploy.images import load_image
    from fgh_deploy.train.data import load_dataset

    dataset = load_dataset(cub100)
    by_class: dict[int, list] = {}
    for sample in sorted(dataset.database + dataset.query):
        by_class.setdefault(sample.label, []).append(sample)
    samples = [s for label in sorted(by_class)[:20] for s in by_class[label][:25]]
    labels = torch.tensor([s.label for s in samples])
    torch.manual_seed(0)
    models = {name: fgh.build_model(name, 32, backbone="efficientnet_lite0", pretrained=True).eval()
              for name in MODELS}
    first = models["adsh"]
    pixels = torch.stack([load_image(dataset.root / s.relpath, first.preprocess) for s in samples])
    scores = {}
    with torch.no_grad():
        fmap = torch.cat([first.trunk(first.normalize(chunk)) for chunk in pixels.split(50)])
        for name, model in models.items():
            features = torch.cat([model.global_features(chunk) for chunk in fmap.split(50)])
            scores[name] = _cosine_map(features, labels)
    print(f"\ncosine mAP of the global branch at initialisation: {scores}")
    assert scores["adsh"] > 0.6
    for name, score in scores.items():
        assert score >= scores["adsh"] - 0.01, f"{name}: {score:.3f} vs adsh {scores['adsh']:.3f}"


def _cosine_map(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Leave-one-out mAP@all of cosine similarity ranking."""
    f = torch.nn.functional.normalize(features.double(), dim=1)
    sim = f @ f.T
    sim.fill_diagonal_(-float("inf"))
    order = sim.argsort(dim=1, descending=True, stable=True)[:, :-1]
    relevant = (labels[order] == labels[:, None]).double()
    precision = relevant.cumsum(1) / torch.arange(1, order.shape[1] + 1)
    return float(((precision * relevant).sum(1) / relevant.sum(1)).mean())
