"""Loss values against hand-computed numbers and torch references on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mammocad.errors import ConfigError
from mammocad.training.losses import (
    BCEWithPosWeight,
    DiceCELoss,
    FocalLoss,
    SoftDiceLoss,
    WeightedCrossEntropy,
    create_loss,
    frequency_weights,
    list_losses,
)


def softplus(v: float) -> float:  # -log(sigmoid(-v)) = BCE of logit v against target 0
    return math.log1p(math.exp(v))


# one image 1x4: logits 2, -1, 0.5, -3 ; targets 1, 0, 1, 0
LOGITS = torch.tensor([2.0, -1.0, 0.5, -3.0]).reshape(1, 1, 1, 4)
TARGET = torch.tensor([1, 0, 1, 0]).reshape(1, 1, 4)


def test_bce_pos_weight_by_hand_and_vs_torch():
    loss = BCEWithPosWeight(pos_weight=3.0)(LOGITS, TARGET)
    by_hand = (3 * softplus(-2.0) + softplus(-1.0) + 3 * softplus(-0.5) + softplus(-3.0)) / 4
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    ref = F.binary_cross_entropy_with_logits(LOGITS, TARGET[:, None].float(), pos_weight=torch.tensor(3.0))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert BCEWithPosWeight()(LOGITS, TARGET.bool()).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(LOGITS, TARGET[:, None].float()).item(), rel=1e-6
    )


def test_bce_auto_pos_weight_is_negative_over_positive_pixels():
    target = torch.tensor([1, 0, 0, 0]).reshape(1, 1, 1, 4)  # 1 positive, 3 negatives -> 3
    auto = BCEWithPosWeight(pos_weight="auto")(LOGITS, target)
    assert auto.item() == pytest.approx(BCEWithPosWeight(pos_weight=3.0)(LOGITS, target).item(), rel=1e-6)
    # no positive pixel: weight 1
    empty = torch.zeros(1, 1, 1, 4)
    assert BCEWithPosWeight("auto")(LOGITS, empty).item() == pytest.approx(BCEWithPosWeight()(LOGITS, empty).item())


def test_valid_mask_and_ignore_index_drop_pixels():
    valid = torch.tensor([True, False, True, False]).reshape(1, 1, 4)
    masked = BCEWithPosWeight()(LOGITS, TARGET, valid_mask=valid)
    assert masked.item() == pytest.approx((softplus(-2.0) + softplus(-0.5)) / 2, rel=1e-6)
    ignored = torch.tensor([1, 255, 1, 255]).reshape(1, 1, 4)
    assert BCEWithPosWeight(ignore_index=255)(LOGITS, ignored).item() == pytest.approx(masked.item(), rel=1e-6)
    # multi-class: ignore_index as torch's cross_entropy
    logits = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, 3, (2, 4, 5), generator=torch.Generator().manual_seed(2))
    target[0, 0] = -100
    ref = F.cross_entropy(logits, target, ignore_index=-100)
    assert FocalLoss(gamma=0.0, ignore_index=-100)(logits, target).item() == pytest.approx(ref.item(), rel=1e-5)
    # nothing valid: zero loss, zero (finite) gradients
    x = LOGITS.clone().requires_grad_()
    none_valid = SoftDiceLoss()(x, TARGET, valid_mask=torch.zeros(1, 1, 4, dtype=torch.bool)) + BCEWithPosWeight()(
        x, TARGET, valid_mask=torch.zeros(1, 1, 4, dtype=torch.bool)
    )
    none_valid.backward()
    assert none_valid.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


def test_weighted_ce_weights_are_one_minus_share():
    assert frequency_weights(torch.tensor([5.0, 3.0, 0.0])).tolist() == [0.375, 0.625, 1.0]
    logits = torch.randn(1, 3, 2, 4, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([[[0, 0, 0, 0], [0, 1, 1, 1]]])  # shares 5/8, 3/8, 0
    loss = WeightedCrossEntropy()(logits, target)
    ref = F.cross_entropy(logits, target, weight=torch.tensor([0.375, 0.625, 1.0]))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    given = WeightedCrossEntropy(class_frequencies=[80, 15, 5])(logits, target)  # w = 0.2, 0.85, 0.95
    assert given.item() == pytest.approx(F.cross_entropy(logits, target, weight=torch.tensor([0.2, 0.85, 0.95])).item(), rel=1e-6)
    # binary: classes (background, lesion); 1 lesion pixel of 4 -> w = (0.25, 0.75)
    target = torch.tensor([1, 0, 0, 0]).reshape(1, 1, 4)
    binary = WeightedCrossEntropy()(LOGITS, target)
    by_hand = (0.75 * softplus(-2.0) + 0.25 * (softplus(-1.0) + softplus(0.5) + softplus(-3.0))) / (0.75 + 3 * 0.25)
    assert binary.item() == pytest.approx(by_hand, rel=1e-6)
    with pytest.raises(ConfigError, match="need 2 values"):
        WeightedCrossEntropy(class_frequencies=[1, 2, 3])(LOGITS, target)


def test_soft_dice_values():
    perfect = torch.tensor([20.0, -20, 20, -20]).reshape(1, 1, 1, 4)
    assert SoftDiceLoss(smooth=0.0)(perfect, TARGET).item() == pytest.approx(0.0, abs=1e-6)
    half = torch.zeros(1, 1, 1, 4)  # p = 0.5 everywhere, 2 of 4 pixels positive
    assert SoftDiceLoss(smooth=0.0)(half, TARGET).item() == pytest.approx(1 - 2 * 1 / (2 + 2))
    assert SoftDiceLoss(smooth=1.0)(half, TARGET).item() == pytest.approx(1 - 3 / 5)
    # background channel 1 - p against 1 - t gives the same 0.5 here; mean stays 0.5
    assert SoftDiceLoss(smooth=0.0, include_background=True)(half, TARGET).item() == pytest.approx(0.5)
    # batch vs per-image: image A has 1 of 4 positive, image B 3 of 4; p = 0.5
    target = torch.tensor([[[1, 0, 0, 0]], [[1, 1, 1, 0]]])
    logits = torch.zeros(2, 1, 1, 4)
    per_image = SoftDiceLoss(smooth=0.0)(logits, target).item()
    assert per_image == pytest.approx(1 - (2 * 0.5 / 3 + 2 * 1.5 / 5) / 2)
    assert SoftDiceLoss(smooth=0.0, batch_dice=True)(logits, target).item() == pytest.approx(1 - 2 * 2 / 8)
    # multi-class: perfect one-hot logits -> 0; background excluded by default
    t3 = torch.tensor([[[0, 1, 2, 2]]])
    logits3 = 20 * F.one_hot(t3, 3).permute(0, 3, 1, 2).float()
    assert SoftDiceLoss(smooth=0.0)(logits3, t3).item() == pytest.approx(0.0, abs=1e-6)
    uniform = torch.zeros(1, 3, 1, 4)  # p = 1/3: class 1 dice 2(1/3)/(4/3+1) = 2/7, class 2 2(2/3)/(4/3+2) = 2/5
    assert SoftDiceLoss(smooth=0.0)(uniform, t3).item() == pytest.approx(1 - (2 / 7 + 2 / 5) / 2)


def test_focal_loss_values():
    logits = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(3))
    target = torch.randint(0, 3, (2, 4, 5), generator=torch.Generator().manual_seed(4))
    assert FocalLoss(gamma=0.0)(logits, target).item() == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-5)
    assert FocalLoss(gamma=0.0)(LOGITS, TARGET).item() == pytest.approx(BCEWithPosWeight()(LOGITS, TARGET).item(), rel=1e-6)
    zero = torch.zeros(1, 1, 1, 1)
    one = torch.ones(1, 1, 1)
    assert FocalLoss(gamma=2.0)(zero, one).item() == pytest.approx(0.25 * math.log(2), rel=1e-6)
    assert FocalLoss(gamma=2.0, alpha=0.25)(zero, one).item() == pytest.approx(0.0625 * math.log(2), rel=1e-6)
    # multi-class alpha per class: uniform logits, p_t = 1/3
    t = torch.tensor([[[2]]])
    value = FocalLoss(gamma=2.0, alpha=[0.2, 0.3, 0.5])(torch.zeros(1, 3, 1, 1), t).item()
    assert value == pytest.approx(0.5 * (2 / 3) ** 2 * math.log(3), rel=1e-6)
    with pytest.raises(ConfigError, match="one weight per class"):
        FocalLoss(alpha=0.25)(logits, target)


def test_dice_ce_is_the_weighted_sum():
    logits = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(5))
    target = torch.randint(0, 3, (2, 4, 5), generator=torch.Generator().manual_seed(6))
    combo = DiceCELoss(dice_weight=0.3, ce_weight=2.0)(logits, target)
    expected = 0.3 * SoftDiceLoss()(logits, target) + 2.0 * F.cross_entropy(logits, target)
    assert combo.item() == pytest.approx(expected.item(), rel=1e-6)
    binary = DiceCELoss(pos_weight=3.0)(LOGITS, TARGET)
    assert binary.item() == pytest.approx((SoftDiceLoss()(LOGITS, TARGET) + BCEWithPosWeight(3.0)(LOGITS, TARGET)).item(), rel=1e-6)


@pytest.mark.parametrize("name", ["bce", "wce", "dice", "dice_ce", "focal"])
@pytest.mark.parametrize("num_classes", [1, 3])
def test_every_loss_gives_finite_gradients(name, num_classes):
    if name == "bce" and num_classes == 3:
        with pytest.raises(ConfigError, match="binary logits"):
            create_loss("bce")(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
        return
    g = torch.Generator().manual_seed(7)
    logits = (10 * torch.randn(2, num_classes, 8, 8, generator=g)).requires_grad_()
    if num_classes == 1:
        target = torch.rand(2, 8, 8, generator=g) > 0.7
    else:
        target = torch.randint(0, 3, (2, 8, 8), generator=g)
    valid = torch.rand(2, 8, 8, generator=g) > 0.2
    loss = create_loss(name)(logits, target, valid_mask=valid)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # ignored pixels get no gradient
    assert torch.all(logits.grad.permute(1, 0, 2, 3)[:, ~valid] == 0)


def test_factory_and_target_errors():
    assert list_losses() == ["bce", "dice", "dice_ce", "focal", "wce"]
    assert isinstance(create_loss("dice_ce", pos_weight="auto"), DiceCELoss)
    with pytest.raises(ConfigError, match="unknown loss; known: bce"):
        create_loss("lovasz")
    with pytest.raises(ConfigError, match="loss dice.*smoth"):
        create_loss("dice", smoth=1.0)
    with pytest.raises(ConfigError, match="pos_weight"):
        create_loss("bce", pos_weight=-1)
    with pytest.raises(ConfigError, match=r"0/255 mask"):
        create_loss("bce")(LOGITS, TARGET * 255)
    with pytest.raises(ConfigError, match=r"classes must be in 0..2"):
        create_loss("focal")(torch.zeros(1, 3, 1, 4), torch.tensor([[[0, 1, 2, 3]]]))
    with pytest.raises(ConfigError, match="does not match logits"):
        create_loss("dice")(LOGITS, torch.zeros(1, 1, 5))
