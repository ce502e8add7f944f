"""Mask R-CNN lesion detector (``create_model("maskrcnn", num_classes=1)``): torchvision's
``MaskRCNN`` on a mammocad backbone with an FPN, for grey images, without any hidden resize.

Registered for the ``"detect"`` task, so the segmentation contract (logits ``N, C, H, W``) does not
apply: the input is a list of ``(1, H, W)`` images in [0, 1] (or an ``(N, 1, H, W)`` batch); in
train mode with targets (``boxes (K, 4)`` xyxy in pixels, ``labels (K,)`` in ``1..num_classes``,
``masks (K, H, W)`` uint8; ``K = 0`` for a normal image) it returns torchvision's five losses, in eval
mode one dict per image: ``boxes``, ``labels`` (1..num_classes), ``scores``, ``masks (K, 1, H, W)``
probabilities, all in the input's pixel coordinates.

Choices, and why:

- Backbone: ``backbones.create_backbone`` stages 1-4 (strides 4, 8, 16, 32 = ResNet's C2-C5) into
  torchvision's ``FeaturePyramidNetwork`` with a ``LastLevelMaxPool`` "pool" level (stride 64), as
  torchvision's ``BackboneWithFPN``; the mammocad backbone returns a list, wrapped into the
  ``OrderedDict`` the FPN takes. ``efficientnet_lite0`` (packaged ImageNet weights, works offline) is
  the default; ``resnet50`` (the papers' setting) takes ``pretrained=PATH`` to a local state dict.
- Normalisation: the backbone's grey ``normalization`` is torchvision's ``image_mean``/``image_std``
  (its ``GeneralizedRCNNTransform`` normalises), recorded in the kwargs so a bundle rebuilds it.
- No resize: torchvision rescales every image so that its short side is ``min_size`` (unless the
  long side would exceed ``max_size``): an image would silently be seen at another scale than the
  one the tiler and the evaluation assume, and lesion sizes in pixels would mean different things
  for different input shapes. ``NoResizeTransform.resize`` returns the image unchanged; the batch is
  still padded (bottom/right, zero = mean grey after normalisation) to a multiple of 64, so every FPN
  level including "pool" (stride 64) has an exact grid and the anchor generator's strides
  (``padded size // grid size``) are exact (with 32, a side of 480 gives the pool level a stride of
  60 for anchors, 64 for the features). ``size_divisor = 64``: tiles that are multiples of it need
  no padding; any size works. There is no ``size``/``min_size`` argument: nothing is resized.
- Heads: torchvision's plain heads, narrower (``fpn_channels`` 128, ``box_head_width`` 256, mask
  head of ``mask_head_channels``) so the detector trains on a CPU: 6.05 M parameters with Lite0;
  torchvision's widths (FPN 256, a 1024-wide box MLP: 12.8 M parameters alone) give 22.5 M. The
  mask logits start at p = 0.5 (Detectron2's init, see below). Masks come back as torchvision's
  full-size ``(K, 1, H, W)`` float maps: 3.4 MB per detection on a 1024x832 image.
- ``box_score_thresh`` 0.05: low, so candidates for a FROC curve exist; the bundle's operating
  threshold is applied later by the task. ``rpn_*_nms_top_n_test`` 500/200 (torchvision: 1000/1000):
  a handful of lesions per image does not need 1000 proposals, and the RPN's NMS over 5 x 1000
  boxes plus the box head over 1000 RoIs cost 0.7 s of 2.9 s on one thread (1024x832, Lite0;
  ``benchmarks/bench_detector.py``). ``box_detections_per_img`` stays 100 (COCO's ``maxDets``);
  the mask head and the full-size mask pasting cost about 7 ms per detection on one thread.
- ``frozen_bn`` (default): the backbone's BatchNorm becomes ``FrozenBatchNorm2d`` with the same
  statistics and affine (buffers only), as torchvision's detectors do: batch statistics of the 1-4
  images a CPU trains with are noise. The training engine makes every *parameter* trainable at
  each stage start; frozen BN has none, so it stays frozen.
- Every resolved constructor argument is recorded (``recorded_kwargs``), not only the ones passed:
  thresholds and top-n decide what the detector outputs, so a later change of a default must not
  change what a shipped bundle computes.

Staged training (the papers' Matterport schedule) freezes parameters by name prefix
(``train.stages[].freeze``, spelled out in the configs); ``stage_prefixes(model, stage)`` lists them. Parameter names are
``backbone.body.stages.<i>.`` (stage ``i`` has stride ``2 ** (i + 1)``: 0 = ResNet C1 (conv1),
1 = C2 (layer1), 2 = C3, 3 = C4, 4 = C5; EfficientNet-Lite's blocks of the same strides),
``backbone.fpn.``, ``rpn.``, ``roi_heads.``:

- ``"heads"``: freeze ``backbone.body`` (FPN, RPN and heads train, as Matterport's "heads");
- ``"4+"``: freeze ``backbone.body.stages.0`` .. ``.2`` (C1-C3; C4, C5, FPN and heads train);
- ``"all"``: freeze nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from mammocad.errors import ConfigError
from mammocad.models.backbones import Backbone, Pretrained
from mammocad.models.encoders import build_encoder
from mammocad.models.registry import register_model

NAME = "maskrcnn"
OUT_INDICES = (1, 2, 3, 4)  # backbone stages of strides 4, 8, 16, 32 (C2-C5)
NUM_LEVELS = len(OUT_INDICES) + 1  # + the "pool" level (stride 64)
PAD_MULTIPLE = 64  # the pool level's stride: every level's grid is exact
# The papers' training stages, for stage_prefixes (see the module docstring).
STAGES = ("heads", "4+", "all")


class NoResizeTransform(GeneralizedRCNNTransform):
    """torchvision's transform (normalise, pad, batch; map outputs back) without the resize."""

    def resize(self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None,
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        return image, target

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(mean={self.image_mean}, std={self.image_std}, "
                f"pad to a multiple of {self.size_divisible}, no resize)")


class BackboneFPN(nn.Module):
    """torchvision's ``BackboneWithFPN`` for a mammocad ``Backbone`` (which returns a list of maps)."""

    def __init__(self, body: Backbone, out_channels: int):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.out_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels  # what MaskRCNN's heads read

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


class FrozenBatchNormAct2d(FrozenBatchNorm2d):
    """timm's ``BatchNormAct2d`` (norm, dropout, activation in one module; EfficientNet-Lite) frozen:
    the activation must survive the replacement."""

    def __init__(self, num_features: int, eps: float, drop: nn.Module, act: nn.Module):
        super().__init__(num_features, eps=eps)
        self.drop, self.act = drop, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` in ``module`` (in place) by a ``FrozenBatchNorm2d`` with the
    same running statistics, affine and eps (timm's ``BatchNormAct2d`` keeps its activation)."""
    for name, child in module.named_children():
        if not isinstance(child, nn.BatchNorm2d):
            freeze_batchnorm(child)
            continue
        if hasattr(child, "act") and hasattr(child, "drop"):  # timm's BatchNormAct2d
            frozen = FrozenBatchNormAct2d(child.num_features, child.eps, child.drop, child.act)
        else:
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
        if child.running_mean is None:
            raise ConfigError(f"model {NAME}", f"{name}: a BatchNorm without running statistics cannot be frozen")
        with torch.no_grad():
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            if child.affine:
                frozen.weight.copy_(child.weight)
                frozen.bias.copy_(child.bias)
        setattr(module, name, frozen.to(child.running_var.device))
    return module


def stage_prefixes(model: nn.Module, stage: str) -> list[str]:
    """Parameter-name prefixes to freeze (``train.stages[].freeze``) for the papers' ``stage``:
    ``"heads"`` (backbone frozen), ``"4+"`` (ResNet C1-C3 frozen), ``"all"`` (nothing)."""
    if stage not in STAGES:
        raise ConfigError(f"model {NAME}", f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    body = getattr(getattr(model, "backbone", None), "body", None)
    if not isinstance(body, Backbone):
        raise ConfigError(f"model {NAME}", "stage_prefixes needs a maskrcnn model (backbone.body is a Backbone)")
    if stage == "heads":
        return ["backbone.body"]
    if stage == "4+":  # stages 0, 1, 2 have strides 2, 4, 8: ResNet's C1, C2, C3
        return [f"backbone.body.stages.{i}" for i in range(min(3, len(body.stages)))]
    return []


def _positive_int(key: str, value: Any, high: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1 or (high is not None and value > high):
        raise ConfigError(f"model {NAME}", f"{key} must be an integer in 1..{high or 'inf'}, got {value!r}")
    return value


def _fraction(key: str, value: Any, low_open: bool = True) -> float:
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1
            or (low_open and value == 0)):
        raise ConfigError(f"model {NAME}", f"{key} must be a number in {'(0' if low_open else '[0'}, 1], got {value!r}")
    return float(value)


def _anchors(sizes: Sequence[Any], ratios: Sequence[Any]) -> AnchorGenerator:
    """One anchor size per FPN level (P2..P6), every aspect ratio on each."""
    if (not isinstance(sizes, (list, tuple)) or len(sizes) != NUM_LEVELS
            or any(isinstance(s, bool) or not isinstance(s, (int, float)) or s <= 0 for s in sizes)):
        raise ConfigError(f"model {NAME}", f"anchor_sizes must be {NUM_LEVELS} positive numbers (one per FPN level, "
                                           f"strides 4..64), got {sizes!r}")
    if (not isinstance(ratios, (list, tuple)) or not ratios
            or any(isinstance(r, bool) or not isinstance(r, (int, float)) or r <= 0 for r in ratios)):
        raise ConfigError(f"model {NAME}", f"aspect_ratios must be positive numbers, got {ratios!r}")
    return AnchorGenerator(tuple((s,) for s in sizes), (tuple(float(r) for r in ratios),) * NUM_LEVELS)


@register_model(NAME, task="detect")
def maskrcnn(
    num_classes: int = 1,
    backbone: str = "efficientnet_lite0",
    pretrained: Pretrained = True,
    normalization: dict[str, Any] | None = None,
    frozen_bn: bool = True,
    fpn_channels: int = 128,
    anchor_sizes: Sequence[float] = (16, 32, 64, 128, 256),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    rpn_batch_size_per_image: int = 256,
    rpn_positive_fraction: float = 0.5,
    rpn_pre_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_train: int = 2000,
    rpn_pre_nms_top_n_test: int = 500,
    rpn_post_nms_top_n_test: int = 200,
    rpn_nms_thresh: float = 0.7,
    box_batch_size_per_image: int = 512,
    box_positive_fraction: float = 0.25,
    box_score_thresh: float = 0.05,
    box_nms_thresh: float = 0.5,
    box_detections_per_img: int = 100,
    box_head_width: int = 256,
    mask_head_channels: int | None = None,
    mask_head_layers: int = 4,
) -> MaskRCNN:
    """Mask R-CNN for ``num_classes`` lesion classes (1 = "lesion", 2 = benign/malignant) on grey
    images; torchvision's class 0 is the background. See the module docstring for each choice."""
    if not isinstance(backbone, str):
        raise ConfigError(f"model {NAME}", f"backbone must be a backbone name, got {backbone!r}")
    if not isinstance(frozen_bn, bool):
        raise ConfigError(f"model {NAME}", f"frozen_bn must be true or false, got {frozen_bn!r}")
    num_classes = _positive_int("num_classes", num_classes)
    fpn_channels = _positive_int("fpn_channels", fpn_channels)
    box_head_width = _positive_int("box_head_width", box_head_width)
    mask_head_channels = _positive_int("mask_head_channels",
                                       fpn_channels if mask_head_channels is None else mask_head_channels)
    mask_head_layers = _positive_int("mask_head_layers", mask_head_layers, high=8)
    counts = {k: _positive_int(k, v) for k, v in {
        "rpn_batch_size_per_image": rpn_batch_size_per_image, "rpn_pre_nms_top_n_train": rpn_pre_nms_top_n_train,
        "rpn_post_nms_top_n_train": rpn_post_nms_top_n_train, "rpn_pre_nms_top_n_test": rpn_pre_nms_top_n_test,
        "rpn_post_nms_top_n_test": rpn_post_nms_top_n_test, "box_batch_size_per_image": box_batch_size_per_image,
        "box_detections_per_img": box_detections_per_img}.items()}
    fractions = {k: _fraction(k, v, low_open) for k, v, low_open in (
        ("rpn_positive_fraction", rpn_positive_fraction, True), ("box_positive_fraction", box_positive_fraction, True),
        ("rpn_nms_thresh", rpn_nms_thresh, True), ("box_nms_thresh", box_nms_thresh, True),
        ("box_score_thresh", box_score_thresh, False))}
    anchor_generator = _anchors(anchor_sizes, aspect_ratios)

    body, _, record = build_encoder(NAME, backbone, pretrained, 1, normalization, OUT_INDICES)
    assert body.strides == [4, 8, 16, 32], body.strides  # stage i has stride 2 ** (i + 1) for every backbone
    if frozen_bn:
        freeze_batchnorm(body)
    nc = num_classes + 1  # + background
    model = MaskRCNN(
        BackboneFPN(body, fpn_channels), num_classes=None,  # None: the predictors below are given
        image_mean=record["mean"], image_std=record["std"],
        rpn_anchor_generator=anchor_generator,
        box_head=TwoMLPHead(fpn_channels * 7 * 7, box_head_width),  # RoIAlign 7x7, as torchvision
        box_predictor=FastRCNNPredictor(box_head_width, nc),
        mask_head=MaskRCNNHeads(fpn_channels, [mask_head_channels] * mask_head_layers, 1),
        mask_predictor=MaskRCNNPredictor(mask_head_channels, mask_head_channels, nc),
        **counts, **fractions,
    )
    # torchvision inits the mask logits layer He fan-out: std sqrt(2 / (num_classes + 1)) = 1 for one
    # class, giving initial mask losses of 10-50 (measured) that dwarf the others. Detectron2's init
    # (std 0.001, zero bias) starts every mask at p = 0.5, loss log 2.
    nn.init.normal_(model.roi_heads.mask_predictor.mask_fcn_logits.weight, std=0.001)
    nn.init.zeros_(model.roi_heads.mask_predictor.mask_fcn_logits.bias)
    # min_size/max_size only feed the resize, which does nothing here
    model.transform = NoResizeTransform(1, 1, record["mean"], record["std"], size_divisible=PAD_MULTIPLE)
    model.task, model.size_divisor, model.in_channels, model.num_classes = "detect", PAD_MULTIPLE, 1, num_classes
    # every resolved argument but the initial weights (see the module docstring)
    model.recorded_kwargs = {
        "num_classes": num_classes, "backbone": backbone, "normalization": record, "frozen_bn": frozen_bn,
        "fpn_channels": fpn_channels, "anchor_sizes": list(anchor_sizes), "aspect_ratios": list(aspect_ratios),
        **counts, **fractions, "box_head_width": box_head_width, "mask_head_channels": mask_head_channels,
        "mask_head_layers": mask_head_layers,
    }
    return model
