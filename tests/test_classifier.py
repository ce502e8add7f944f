"""The classifiers of the model registry (task ``classify``): one test over every registered
classifier and backbone variant, like timm's test over every model, plus their particular rules."""

from __future__ import annotations

import pytest
import torch

from mammocad.errors import ConfigError
from mammocad.models.registry import create_model, list_models, model_config, model_from_config, model_task

CASES = [  # (model, kwargs): every registered classifier, every backbone family
    ("classifier", {"backbone": "efficientnet_lite0"}),
    ("classifier", {"backbone": "efficientnet_lite1", "pretrained": False}),
    ("classifier", {"backbone": "resnet18", "pretrained": False}),
    ("classifier", {"backbone": "mobilenet_v2", "pretrained": False, "head_channels": 64}),
    ("inception_v3", {}),
]


def test_every_classifier_is_registered_for_the_classify_task():
    assert list_models("classify") == ["classifier", "inception_v3"]
    assert {name for name, _ in CASES} == set(list_models("classify"))
    assert all(model_task(n) == "classify" for n in list_models("classify"))
    assert not set(list_models("classify")) & set(list_models())  # not under the segmentation contract


def _input(model, n: int = 2) -> torch.Tensor:
    side = model.input_size or 64
    return torch.rand(n, model.in_channels, side, side, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name,kwargs", CASES, ids=lambda c: c if isinstance(c, str) else c.get("backbone", ""))
def test_logits_per_image_and_every_parameter_learns(name, kwargs, one_torch_thread):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, **kwargs)
    x = _input(model)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    model.train()
    out = model(x)
    if model.aux_weight:  # Inception-v3: the auxiliary head's logits too, weighted by the task
        assert isinstance(out, tuple) and out[1].shape == (2, 3)
        loss = out[0].sum() + model.aux_weight * out[1].sum()
    else:
        assert isinstance(out, torch.Tensor)
        loss = out.sum()
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not dead, dead[:5]


@pytest.mark.parametrize("name,kwargs", CASES[:1] + CASES[-1:], ids=["lite0", "inception"])
def test_rebuilt_from_json_config_gives_the_same_logits(name, kwargs, one_torch_thread):
    model = create_model(name, num_classes=2, **kwargs).eval()
    config = model_config(model)
    assert "pretrained" not in config["kwargs"] and "normalization" in config["kwargs"]
    rebuilt = model_from_config(config).eval()
    rebuilt.load_state_dict(model.state_dict())
    x = _input(model, 1)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))


def test_grey_input_sums_the_pretrained_rgb_filters_and_normalises_inside():
    from mammocad.models.backbones import create_backbone

    model = create_model("classifier", backbone="efficientnet_lite0", num_classes=2)
    rgb = create_backbone("efficientnet_lite0", in_chans=3)
    grey_w = model.encoder.stages[0][0].weight
    assert grey_w.shape[1] == 1 and torch.allclose(grey_w, rgb.stages[0][0].weight.sum(1, keepdim=True))
    norm = model_config(model)["kwargs"]["normalization"]
    assert len(norm["mean"]) == 1 and model.normalize.mean.item() == pytest.approx(norm["mean"][0])


def test_classifier_errors_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="num_classes must be >= 2"):
        create_model("classifier", num_classes=1)
    with pytest.raises(ConfigError, match="dropout"):
        create_model("classifier", dropout=1.5)
    with pytest.raises(ConfigError, match="no packaged weights"):
        create_model("inception_v3", pretrained=True)
    model = create_model("inception_v3", num_classes=2).eval()
    with pytest.raises(ConfigError, match="H, W >= 75"):
        model(torch.rand(1, 1, 64, 64))
    with pytest.raises(ConfigError, match=r"expected input \(N, 1, H, W\)"):
        create_model("classifier", num_classes=2)(torch.rand(1, 3, 64, 64))
