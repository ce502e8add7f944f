"""The Mask R-CNN detector (``models/maskrcnn.py``): registered for the detect task, torchvision's
losses and outputs, no hidden resize (boxes and masks in input pixels), config round trip, frozen
BatchNorm, the papers' training stages as freeze prefixes, it learns a toy problem, fp16 storage,
its size. Small widths and 128 px images so the file runs in seconds on a 2-core CPU."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d, box_iou

from mammocad.errors import ConfigError
from mammocad.models.registry import create_model, list_models, model_config, model_from_config, model_task

TINY = dict(fpn_channels=32, box_head_width=64, pretrained=False)
LOSSES = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}


@pytest.fixture(autouse=True, scope="module")
def one_thread(one_torch_thread):
    """One intra-op thread for the whole module (conftest.one_torch_thread)."""


def disc_images(size: int = 128, classes: tuple[int, ...] = (1, 1)) -> tuple[list[torch.Tensor], list[dict]]:
    """Grey noisy images, one bright disc each, with torchvision targets (box = the disc's pixels)."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    images, targets = [], []
    for (cy, cx, r), label in zip([(40, 50, 14), (84, 70, 18)], classes):
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        x = 0.2 + 0.05 * torch.randn(1, size, size, generator=g)
        x[0][disc] = 0.8
        ys, xs = torch.nonzero(disc, as_tuple=True)
        box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
        images.append(x.clamp(0, 1))
        targets.append({"boxes": box, "labels": torch.tensor([label]), "masks": disc[None].to(torch.uint8)})
    return images, targets


def empty_target(size: int = 128) -> dict[str, torch.Tensor]:
    return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, size, size, dtype=torch.uint8)}


def test_registered_as_a_detection_model():
    assert model_task("maskrcnn") == "detect" and model_task("unet") == "segment"
    assert "maskrcnn" not in list_models()  # the segmentation contract's test iterates these
    assert list_models("detect") == ["maskrcnn"] and "maskrcnn" in list_models(None)
    assert set(list_models(None)) == set(list_models()) | {"maskrcnn"} | set(list_models("classify"))
    model = create_model("maskrcnn", **TINY)
    assert model.task == "detect" and model.size_divisor == 64 and model.num_classes == 1
    names = {n.split(".")[0] + "." + n.split(".")[1] for n, _ in model.named_parameters()}
    assert names == {"backbone.body", "backbone.fpn", "rpn.head", "roi_heads.box_head", "roi_heads.box_predictor",
                     "roi_heads.mask_head", "roi_heads.mask_predictor"}
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("num_classes", [1, 2])
def test_train_mode_returns_the_five_losses_and_every_parameter_learns(num_classes):
    torch.manual_seed(0)
    model = create_model("maskrcnn", num_classes=num_classes, **TINY).train()
    images, targets = disc_images(classes=(1, num_classes))
    losses = model(images, targets)
    assert set(losses) == LOSSES and all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    sum(losses.values()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.roi_heads.box_predictor.cls_score.out_features == num_classes + 1  # + background
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert all(set(o) == {"boxes", "labels", "scores", "masks"} for o in out)
    labels = torch.cat([o["labels"] for o in out])
    assert len(labels) and labels.min() >= 1 and labels.max() <= num_classes


def test_normal_images_with_empty_targets_train():
    torch.manual_seed(0)
    model = create_model("maskrcnn", **TINY).train()
    images, targets = disc_images()
    for batch_targets in ([empty_target(), targets[1]], [empty_target(), empty_target()]):
        model.zero_grad()
        losses = model(images, batch_targets)
        assert set(losses) == LOSSES and all(torch.isfinite(v) for v in losses.values())
        sum(losses.values()).backward()
        assert model.rpn.head.cls_logits.weight.grad.abs().sum() > 0  # negatives still teach the RPN
    assert losses["loss_mask"] == 0 and losses["loss_box_reg"] == 0  # no lesion: no positive to fit


def test_no_hidden_resize_outputs_are_in_input_pixels():
    model = create_model("maskrcnn", **TINY).eval()
    for h, w in ((320, 448), (300, 450)):
        images, _ = model.transform([torch.rand(1, h, w)])
        assert images.image_sizes == [(h, w)]  # torchvision would have rescaled the short side to 800
        assert tuple(images.tensors.shape) == (1, 1, -(-h // 64) * 64, -(-w // 64) * 64)  # padded only
    stock = GeneralizedRCNNTransform(800, 1333, [0.5], [0.5])
    assert stock([torch.rand(1, 320, 448)])[0].image_sizes == [(800, 1120)]  # what NoResizeTransform avoids

    class FixedHeads(nn.Module):  # one known detection in the coordinates the heads see
        def forward(self, features, proposals, image_sizes, targets=None):
            return [{"boxes": torch.tensor([[10.0, 20.0, 110.0, 220.0]]), "labels": torch.tensor([1]),
                     "scores": torch.tensor([0.9]), "masks": torch.full((1, 1, 28, 28), 0.75)}], {}

    model.roi_heads = FixedHeads()
    with torch.no_grad():
        (out,) = model(torch.rand(1, 1, 300, 450))  # an (N, 1, H, W) batch works as a list would
    assert torch.equal(out["boxes"], torch.tensor([[10.0, 20.0, 110.0, 220.0]]))
    mask = out["masks"][0, 0]
    assert mask.shape == (300, 450)
    assert mask[30:210, 20:100].min() > 0.7 and mask[230:, :].max() == 0 and mask[:, 120:].max() == 0


def test_eval_output_of_a_random_model():
    torch.manual_seed(0)
    model = create_model("maskrcnn", num_classes=2, **TINY).eval()
    with torch.no_grad():
        (out,) = model([torch.rand(1, 160, 224)])
    n = len(out["boxes"])
    assert 0 < n <= 100 and out["masks"].shape == (n, 1, 160, 224) and out["scores"].min() >= 0.05
    assert out["masks"].min() >= 0 and out["masks"].max() <= 1
    assert (out["boxes"][:, 2] <= 224).all() and (out["boxes"][:, 3] <= 160).all() and (out["boxes"] >= 0).all()
    with pytest.raises(ConfigError, match=r"expected input \(N, 1, H, W\)"):
        model([torch.rand(3, 64, 64)])


def test_rebuilt_from_json_config_gives_identical_detections():
    torch.manual_seed(0)
    model = create_model("maskrcnn", num_classes=2, **TINY).eval()
    cfg = json.loads(json.dumps(model_config(model)))
    kwargs = cfg["kwargs"]
    assert cfg["name"] == "maskrcnn" and "pretrained" not in kwargs
    assert kwargs["normalization"]["mean"] == [0.5] and kwargs["normalization"]["std"] == [0.5]  # TF Lite weights
    assert kwargs["backbone"] == "efficientnet_lite0" and kwargs["box_score_thresh"] == 0.05
    assert kwargs["anchor_sizes"] == [16, 32, 64, 128, 256] and kwargs["mask_head_channels"] == 32
    assert model.transform.image_mean == [0.5] and model.transform.image_std == [0.5]
    rebuilt = model_from_config(cfg).eval()
    assert model_config(rebuilt) == cfg
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    images, _ = disc_images()
    with torch.no_grad():
        a, b = model(images), rebuilt(images)
    for x, y in zip(a, b):
        assert len(x["boxes"]) > 0 and all(torch.equal(x[k], y[k]) for k in x)
    resnet = create_model("maskrcnn", backbone="resnet18", **TINY)
    assert resnet.transform.image_mean == pytest.approx([0.4488], abs=1e-4)  # grey ImageNet statistics


def test_frozen_batchnorm_keeps_statistics_and_activation():
    torch.manual_seed(0)
    frozen = create_model("maskrcnn", fpn_channels=32, box_head_width=64).eval()  # packaged Lite0 weights
    live = create_model("maskrcnn", fpn_channels=32, box_head_width=64, frozen_bn=False).eval()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in live.backbone.body.modules())
    assert n_bn == sum(isinstance(m, FrozenBatchNorm2d) for m in frozen.backbone.body.modules()) > 40
    assert not any("running" in n or "bn" in n for n, _ in frozen.named_parameters())  # buffers only
    x = torch.rand(1, 1, 64, 96)
    with torch.no_grad():
        for f, g in zip(frozen.backbone.body(x), live.backbone.body(x)):  # eps 1e-3 and ReLU6 kept
            torch.testing.assert_close(f, g, rtol=1e-4, atol=1e-4 * float(g.abs().max()))
        frozen.train()
        for f, g in zip(frozen.backbone.body(x), live.backbone.body(x)):  # train mode: same statistics
            torch.testing.assert_close(f, g, rtol=1e-4, atol=1e-4 * float(g.abs().max()))
    resnet = create_model("maskrcnn", backbone="resnet18", **TINY)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in resnet.modules())


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "resnet18"])
def test_stage_prefixes_freeze_the_papers_stages(backbone):
    from mammocad.models.maskrcnn import stage_prefixes

    model = create_model("maskrcnn", backbone=backbone, **TINY)
    names = [n for n, _ in model.named_parameters()]

    def frozen_by(stage: str) -> set[str]:  # as training's apply_stage matches a freeze prefix
        prefixes = stage_prefixes(model, stage)
        return {n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)}

    body = {n for n in names if n.startswith("backbone.body.")}
    assert frozen_by("heads") == body and frozen_by("all") == set()
    early = {n for n in body if int(n.split(".")[3]) < 3}  # stages 0-2: strides 2, 4, 8 (C1-C3)
    assert frozen_by("4+") == early and early and body - early
    if backbone == "resnet18":  # stage 3 is torchvision's layer3 (C4): 128 -> 256 channels
        assert model.backbone.body.stages[3][0].conv1.weight.shape[:2] == (256, 128)
    with pytest.raises(ConfigError, match="stage must be one of heads, 4\\+, all"):
        stage_prefixes(model, "3+")


def test_learns_a_disc_per_image():
    """40-50 SGD steps on two images: the loss falls well below half and each disc is found."""
    torch.manual_seed(0)
    model = create_model("maskrcnn", fpn_channels=32, box_head_width=64, mask_head_layers=2,
                         box_batch_size_per_image=64, rpn_batch_size_per_image=64, rpn_pre_nms_top_n_train=200,
                         rpn_post_nms_top_n_train=100)  # packaged Lite0 weights: the default backbone
    images, targets = disc_images()
    opt = torch.optim.SGD(model.parameters(), lr=5e-3, momentum=0.9)
    history = []
    model.train()
    for _ in range(50):
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert sum(history[-5:]) / 5 < 0.5 * history[0], history  # measured 1.92 -> ~0.25
    model.eval()
    with torch.no_grad():
        out = model(images)
    for o, t in zip(out, targets):
        assert o["scores"][0] > 0.5 and box_iou(o["boxes"][:1], t["boxes"]).item() > 0.5, (o["boxes"][:1], t)
        mask = o["masks"][0, 0] > 0.5
        dice = 2 * (mask & t["masks"][0].bool()).sum() / (mask.sum() + t["masks"][0].sum())
        assert dice > 0.6


def test_fp16_storage_keeps_detections(tmp_path):
    """A bundle stored in fp16 (``save_bundle(weights_dtype="float16")``: half the file) and loaded
    back into fp32 (``load_bundle``) detects the same."""
    from mammocad.models.bundle import WEIGHTS_FILE, load_bundle, save_bundle
    from mammocad.preprocess.pipeline import PreprocessSpec

    torch.manual_seed(0)
    model = create_model("maskrcnn", fpn_channels=32, box_head_width=64, box_score_thresh=0.0).eval()
    card = {"name": "det", "task": "detect", "class_names": ["background", "lesion"],
            "preprocessing": PreprocessSpec(long_side=128).model_dump(mode="json"), "tiling": {"mode": "whole"}}
    full = save_bundle(tmp_path / "fp32", model, card)
    half = save_bundle(tmp_path / "fp16", model, card, weights_dtype="float16")
    assert (half / WEIGHTS_FILE).stat().st_size < 0.55 * (full / WEIGHTS_FILE).stat().st_size
    loaded, _ = load_bundle(half)
    images, _ = disc_images()
    with torch.no_grad():
        for a, b in zip(model(images), loaded(images)):
            assert abs(a["scores"][0] - b["scores"][0]) < 1e-2
            assert (a["boxes"][0] - b["boxes"][0]).abs().max() < 1.0


def test_size_and_construction_without_weights():
    """Default model: 6.05 M parameters (Lite0 stages 0-4 2.92 M, FPN 0.65 M, RPN 0.15 M, box head
    1.67 M, mask head + predictor 0.66 M); fpn_channels 256 + box_head_width 1024 (torchvision's
    widths): 22.5 M. Built on the meta device (what the registry's size check does) nothing is read."""
    with torch.device("meta"):
        model = create_model("maskrcnn")  # pretrained=True: the weights file is not read on meta
        wide = create_model("maskrcnn", fpn_channels=256, box_head_width=1024)
    n = sum(p.numel() for p in model.parameters())
    assert 5.5e6 < n < 6.5e6 and model.backbone.body.weights is None
    assert 20e6 < sum(p.numel() for p in wide.parameters()) < 25e6


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_classes=0), "num_classes must be an integer"),
    (dict(anchor_sizes=[32, 64, 128]), "anchor_sizes must be 5 positive numbers"),
    (dict(aspect_ratios=[]), "aspect_ratios must be positive"),
    (dict(mask_head_layers=100), "mask_head_layers must be an integer in 1..8"),
    (dict(box_positive_fraction=0), "box_positive_fraction must be a number in \\(0, 1\\]"),
    (dict(box_score_thresh=1.5), "box_score_thresh"),
    (dict(frozen_bn="yes"), "frozen_bn must be true or false"),
    (dict(backbone="vgg16"), "unknown backbone"),
    (dict(fpn_channels=8192), "fpn_channels: 8192 exceeds the bound 4096"),  # registry.SIZE_BOUNDS
    (dict(box_head_width=10**6), "box_head_width: 1000000 exceeds the bound 4096"),
    (dict(normalization={"mean": [0.5, 0.5], "std": [0.5, 0.5]}), "normalization needs"),
    (dict(box_nms=0.5), "unexpected keyword"),
])
def test_bad_arguments_fail_in_one_line(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        create_model("maskrcnn", **{**TINY, **kwargs})
