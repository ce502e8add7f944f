"""Segmentation models on pretrained encoders (issue 7.2): ``unet``/``deeplabv3``/``fcn*`` with
``encoder=...``. The contract over every model (shape, gradients, overfitting, JSON rebuild, bf16)
is in ``test_models.py``; here what is specific to the encoders: ``pretrained`` is init-only (a
bundle loads without the ImageNet file), the normalisation is inside the model, any input size
works, freezing the encoder by name, and ``encoder=None`` leaving the shipped bundles unchanged."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mammocad.errors import ConfigError
from mammocad.models import backbones, create_model, model_config, model_from_config
from mammocad.models.bundle import load_bundle, save_bundle
from mammocad.preprocess.pipeline import PreprocessSpec
from mammocad.training.builders import apply_stage

SMALL_UNET = dict(encoder="efficientnet_lite0", decoder_channels=[32, 16, 16, 8, 8])


@pytest.fixture(autouse=True, scope="module")
def one_thread(one_torch_thread):
    """One intra-op thread for the whole module (conftest.one_torch_thread)."""


def test_shipped_unet_bundles_load_strictly_and_predict_as_before():
    """``encoder=None`` is the original U-Net: the shipped bundles (``unet`` without encoder) load
    strictly (load_bundle uses strict=True) and give the logits they gave before the encoder
    variants existed (fingerprints measured at commit 5a2294d on this input)."""
    # us-lesion-seg 2.0 is a Lite0 U-Net (pinned below)
    before = {"mammo-lesion-seg": (-32138.865463018417, -7.02689790725708, -11.540674209594727)}
    x = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    for name, (total, at_10_10, at_40_50) in before.items():
        model, _ = load_bundle(name)
        assert "encoder" not in model_config(model)["kwargs"] and not hasattr(model, "encoder")
        with torch.no_grad():
            y = model(x)
        assert y.double().sum().item() == pytest.approx(total, rel=1e-5)
        assert y[0, 0, 10, 10].item() == pytest.approx(at_10_10, abs=1e-4)
        assert y[0, 0, 40, 50].item() == pytest.approx(at_40_50, abs=1e-4)


def test_shipped_lite0_unet_bundle_predicts_as_shipped():
    """us-lesion-seg 2.0 (Lite0 U-Net, fp16 weights): rebuilt with pretrained=False, loaded strictly,
    the logits it gave when shipped (measured on this input; its sigmoid is within 2.7e-3 of the
    fp32 training run's)."""
    model, card = load_bundle("us-lesion-seg")
    assert model_config(model)["kwargs"]["encoder"] == "efficientnet_lite0" and card.model_extra["weights_dtype"] == "float16"
    x = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x)
    assert y.double().sum().item() == pytest.approx(-10529.330715022981, rel=1e-4)
    assert y[0, 0, 10, 10].item() == pytest.approx(-2.8902862071990967, abs=1e-3)
    assert y[0, 0, 40, 50].item() == pytest.approx(-3.2679386138916016, abs=1e-3)


def test_pretrained_encoder_gets_the_packaged_imagenet_weights():
    torch.manual_seed(0)
    model = create_model("unet", **SMALL_UNET)  # pretrained=True is the default with an encoder
    reference = backbones.create_backbone("efficientnet_lite0", pretrained=True, in_chans=1)
    assert model.encoder.weights["license"] == "Apache-2.0"
    got, want = model.encoder.state_dict(), reference.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    scratch = create_model("unet", pretrained=False, **SMALL_UNET)
    assert scratch.encoder.weights is None
    key = next(k for k in want if k.startswith("stages.1.") and k.endswith("conv_dw.weight"))
    assert not torch.equal(scratch.encoder.state_dict()[key], want[key])


def bundle_card() -> dict:
    return {"name": "enc", "version": "0.1", "task": "segment",
            "preprocessing": PreprocessSpec(modality="US", long_side=96).model_dump(mode="json"),
            "thresholds": {"probability": 0.5, "min_area": 4},
            "tiling": {"tile": 64, "overlap": 0.25, "mode": "sliding", "batch_size": 2, "tta": []}}


def test_bundle_of_a_pretrained_encoder_model_loads_without_the_weights_file(tmp_path, monkeypatch):
    """``pretrained`` is not architecture: not in the card, and loading never reads the ImageNet
    file (it may be uninstalled); the weights, normalisation included, come from the bundle."""
    torch.manual_seed(0)
    model = create_model("unet", pretrained=True, **SMALL_UNET).eval()
    with torch.no_grad():  # a "trained" normalisation, to see that the bundle's own one is used
        model.normalize.mean.fill_(0.3)
    kwargs = model_config(model)["kwargs"]
    assert "pretrained" not in kwargs and kwargs["normalization"]["mean"] == [0.5]
    directory = save_bundle(tmp_path / "enc", model, bundle_card())

    def unreadable(*args, **kwargs):
        raise AssertionError("the ImageNet weights file was read while loading a bundle")

    monkeypatch.setattr(backbones, "packaged_weights_file", unreadable)
    monkeypatch.setattr(backbones, "read_state_dict", unreadable)
    loaded, _ = load_bundle(directory)
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.normalize.mean.item() == pytest.approx(0.3)
    # the predictor and the tiling need no change: prepared pixels in [0, 1], any image size
    from mammocad.inference.predictor import Predictor

    pixels = torch.rand(96, 70, generator=torch.Generator().manual_seed(2)).numpy()
    probs = Predictor(directory, device="cpu").infer(pixels, None)
    assert probs.shape == (1, 96, 70) and ((probs >= 0) & (probs <= 1)).all()
    with pytest.raises(AssertionError, match="ImageNet weights file was read"):  # the patch does bite
        create_model("unet", **SMALL_UNET)


def test_normalization_is_applied_inside_the_model_and_recorded():
    for encoder, mean, std in (("efficientnet_lite0", 0.5, 0.5), ("resnet18", 0.44880, 0.22598)):
        model = create_model("unet", encoder=encoder, pretrained=False, decoder_channels=[8, 8, 8, 8, 8]).eval()
        seen = []
        model.encoder.register_forward_pre_hook(lambda module, args, seen=seen: seen.append(args[0]))
        x = torch.rand(1, 1, 64, 64)
        with torch.no_grad():
            model(x)
        assert torch.allclose(seen[0], (x - mean) / std, atol=1e-4)
        record = model_config(model)["kwargs"]["normalization"]
        assert record == model.encoder.normalization and record["mean"][0] == pytest.approx(mean, abs=1e-5)
    with pytest.raises(ConfigError, match="normalization needs"):
        create_model("unet", pretrained=False, normalization={"mean": [0.5, 0.5], "std": [0.5]}, **SMALL_UNET)


@pytest.mark.parametrize("name,kwargs", [
    ("unet", SMALL_UNET),
    ("deeplabv3", dict(encoder="efficientnet_lite0", aspp_channels=16, dropout=0.0)),
    ("fcn8", dict(encoder="resnet18", pretrained=False, fc_channels=16, dropout=0.0)),
])
def test_any_input_size_works_and_multiples_of_32_are_not_padded(name, kwargs):
    torch.manual_seed(0)
    model = create_model(name, **kwargs).eval()
    assert model.size_divisor == 1 and model.encoder_stride == 32
    x = torch.rand(1, 1, 70, 45)
    with torch.no_grad():
        assert model(x).shape == (1, 1, 70, 45)
        # the padding is an explicit zero (= mean grey) border: the same as padding by hand
        padded = F.pad(x, (0, 19, 0, 26), value=model.normalize.mean.item())
        assert torch.allclose(model(x), model(padded)[..., :70, :45], atol=1e-5)


def test_freezing_the_encoder_by_name_leaves_only_the_decoder_trainable():
    """Staged fine-tuning: ``freeze: [encoder]`` or ``[encoder.stages.0, ...]`` in a training stage."""
    model = create_model("unet", pretrained=False, **SMALL_UNET)
    cfg = SimpleNamespace(source="cfg.yaml")
    encoder = {n for n, _ in model.named_parameters() if n.startswith("encoder.")}
    decoder = {n for n, _ in model.named_parameters()} - encoder
    assert encoder and decoder and all(n.startswith(("decoder.", "head.")) for n in decoder)
    apply_stage(cfg, model, SimpleNamespace(name="heads", model_stage=None, freeze=["encoder"]))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == decoder
    x = torch.rand(2, 1, 64, 64)
    model(x).mean().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == decoder
    # "stages < 2" frozen: exactly the parameters of encoder.stages.0 and .1
    apply_stage(cfg, model, SimpleNamespace(name="mid", model_stage=None,
                                            freeze=["encoder.stages.0", "encoder.stages.1"]))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and frozen == {n for n in encoder if n.startswith(("encoder.stages.0.", "encoder.stages.1."))}
    assert len(model.encoder.stages) == 5


def test_fcn16_with_an_encoder_starts_from_the_trained_fcn32():
    torch.manual_seed(0)
    kw = dict(encoder="resnet18", pretrained=False, fc_channels=16, num_classes=2, upsample="bilinear")
    fcn32 = create_model("fcn32", **kw).eval()
    torch.nn.init.normal_(fcn32.score_fr.weight)
    fcn16 = create_model("fcn16", init_from=fcn32, **kw).eval()
    assert torch.equal(fcn16.encoder.stages[4][0].conv1.weight, fcn32.encoder.stages[4][0].conv1.weight)
    assert torch.equal(fcn16.score_fr.weight, fcn32.score_fr.weight) and not fcn16.score_pool4.weight.any()


def test_encoder_argument_errors():
    with pytest.raises(ConfigError, match="unknown backbone"):
        create_model("unet", encoder="vgg99")
    with pytest.raises(ConfigError, match="decoder_channels must be 5"):
        create_model("unet", encoder="resnet18", pretrained=False, decoder_channels=[8, 8])
    with pytest.raises(ConfigError, match="pretrained=.*needs an encoder"):
        create_model("unet", pretrained="/some/resnet18.pth")
    with pytest.raises(ConfigError, match="resnet18: has no packaged weights"):
        create_model("fcn8", encoder="resnet18")  # no ImageNet weights are shipped for ResNet
    with pytest.raises(ConfigError, match="weights_path is for the ResNet-18 trunk"):
        create_model("deeplabv3", encoder="resnet18", pretrained=False, weights_path="x.safetensors")
    # without an encoder the factories still take pretrained (model_from_config passes False)
    plain = create_model("unet", base_channels=4, depth=2, pretrained=False)
    assert model_config(plain)["kwargs"] == {"base_channels": 4, "depth": 2}
    assert type(model_from_config(model_config(plain))) is type(plain)
