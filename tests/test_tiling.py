import numpy as np
import pytest
import torch
from torch import nn

from mammocad.errors import ConfigError, InputError
from mammocad.devices import cpu_supports_bf16
from mammocad.tasks.tiling import gaussian_importance_map, plan_tiles, predict_tiled


class Pointwise(nn.Module):
    """logit = 10 * (x - 0.5) per pixel: any correct tiling reproduces the full-image result exactly.
    With 3 classes the logits are (-z, z, z / 2). Records the batch size of every forward call."""

    def __init__(self, num_classes: int = 1, size_divisor: int = 1):
        super().__init__()
        self.in_channels, self.num_classes, self.size_divisor = 1, num_classes, size_divisor
        self.scale = nn.Parameter(torch.tensor(10.0))
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        z = self.scale * (x - 0.5)
        return z if self.num_classes == 1 else torch.cat([-z, z, z / 2], dim=1)


def full_image(img: np.ndarray, num_classes: int = 1) -> np.ndarray:
    z = torch.from_numpy(10 * (img - 0.5))[None]
    if num_classes == 1:
        return torch.sigmoid(z).numpy()
    return torch.softmax(torch.cat([-z, z, z / 2]), dim=0).numpy()


def small_unet(depth: int = 2) -> nn.Module:
    from mammocad.models import create_model

    torch.manual_seed(0)
    return create_model("unet", in_channels=1, num_classes=1, base_channels=8, depth=depth).eval()


@pytest.mark.parametrize("shape", [(128, 128), (300, 520), (100, 90), (257, 130), (60, 400)])
def test_sliding_equals_full_image_for_pointwise_model(shape):
    img = np.random.default_rng(sum(shape)).random(shape, dtype=np.float32)
    model = Pointwise()
    out = predict_tiled(model, img, tile=128, overlap=0.25, autocast="fp32")
    assert out.shape == (1, *shape) and out.dtype == np.float32
    np.testing.assert_allclose(out, full_image(img), atol=1e-4)
    # Every window evaluated once, batches of at most 8 windows of exactly the tile size.
    assert sum(c[0] for c in model.calls) == len(plan_tiles(shape, 128, 0.25).starts)
    assert all(c[1:] == (1, 128, 128) and c[0] <= 8 for c in model.calls)


def test_window_layout_matches_monai():
    # 1024 rows, tile 256, overlap 0.25: step int(192) -> 0,192,384,576,768 (the last one at the border).
    plan = plan_tiles((1024, 300), tile=256, overlap=0.25)
    assert sorted(set(plan.starts[:, 0])) == [0, 192, 384, 576, 768]
    assert sorted(set(plan.starts[:, 1])) == [0, 44]
    small = plan_tiles((100, 90), tile=128, overlap=0.5)
    assert small.pad == (14, 14, 19, 19) and small.starts.tolist() == [[0, 0]]
    g = gaussian_importance_map(256, 256)
    assert g.max() == pytest.approx(np.exp(-0.5 * (0.5 / 32) ** 2 * 2), rel=1e-6)  # centre of an even window
    assert g.min() == pytest.approx(1e-3)  # floored, so window borders never divide by ~0
    assert gaussian_importance_map(256, 256) is g  # cached


def test_three_class_softmax_and_batch_size():
    img = np.random.default_rng(3).random((200, 330), dtype=np.float32)
    model = Pointwise(num_classes=3)
    out = predict_tiled(model, img, tile=64, overlap=0.5, batch_size=5, autocast="fp32")
    np.testing.assert_allclose(out, full_image(img, 3), atol=1e-4)
    np.testing.assert_allclose(out.sum(axis=0), 1.0, atol=1e-5)
    n = len(plan_tiles(img.shape, 64, 0.5).starts)
    assert [c[0] for c in model.calls] == [5] * (n // 5) + ([n % 5] if n % 5 else [])


def test_unet_tiled_is_close_to_full_image():
    model = small_unet(depth=2)
    img = np.random.default_rng(0).random((200, 260), dtype=np.float32)
    ours = predict_tiled(model, img, tile=64, overlap=0.5, autocast="fp32")
    with torch.inference_mode():
        x = torch.nn.functional.pad(torch.from_numpy(img)[None, None], (0, 4, 0, 8))  # to size_divisor 4
        full = torch.sigmoid(model(x))[0, :, :200, :260].numpy()
    # A conv net sees less context at window borders; Gaussian blending keeps the result near the
    # full-image forward away from the image border.
    inner = np.abs(ours - full)[:, 16:-16, 16:-16]
    assert inner.mean() < 5e-3 and inner.max() < 0.1
    assert np.abs(ours - 0.5).mean() > 10 * inner.mean()  # the map varies far more than the error


@pytest.mark.slow  # importing MONAI alone takes ~30 s here
def test_unet_tiled_equals_monai_sliding_window_inference():
    monai_inferers = pytest.importorskip("monai.inferers")
    model = small_unet(depth=2)
    img = np.random.default_rng(0).random((200, 260), dtype=np.float32)
    breast = np.zeros(img.shape, bool)
    breast[:90, :100] = True
    ours = predict_tiled(model, img, tile=64, overlap=0.5, autocast="fp32")
    ours_masked = predict_tiled(model, img, tile=64, overlap=0.5, autocast="fp32", breast_mask=breast)
    with torch.inference_mode():
        x = torch.from_numpy(img)[None, None]
        logits = monai_inferers.sliding_window_inference(x, 64, 8, model, overlap=0.5, mode="gaussian")
    theirs = torch.sigmoid(logits)[0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    # With a breast mask: MONAI's values wherever a breast pixel is (all windows over it were run).
    np.testing.assert_allclose(ours_masked[:, breast], theirs[:, breast], atol=1e-5)
    assert (ours_masked[:, 160:, 200:] == 0).all()


def test_windows_without_breast_are_skipped_and_background():
    img = np.random.default_rng(1).random((512, 512), dtype=np.float32)
    breast = np.zeros(img.shape, bool)
    breast[20:150, 10:140] = True  # touches only windows starting at 0 or 96 on both axes
    model = Pointwise()
    out = predict_tiled(model, img, tile=128, overlap=0.25, breast_mask=breast, autocast="fp32")
    assert sum(c[0] for c in model.calls) == 4  # of 25 windows
    plan = plan_tiles(img.shape, 128, 0.25, breast_mask=breast)
    assert plan.keep.sum() == 4 and len(plan.keep) == 25
    full = full_image(img)
    np.testing.assert_allclose(out[:, :224, :224], full[:, :224, :224], atol=1e-4)  # covered by kept windows
    assert (out[:, 224:, :] == 0).all() and (out[:, :, 224:] == 0).all()
    out3 = predict_tiled(Pointwise(3), img, tile=128, overlap=0.25, breast_mask=breast, autocast="fp32")
    assert (out3[0, 300:, 300:] == 1).all() and (out3[1:, 300:, 300:] == 0).all()
    none = predict_tiled(Pointwise(3), img, tile=128, breast_mask=np.zeros_like(breast), autocast="fp32")
    assert none.shape == (3, 512, 512) and (none[0] == 1).all()


def test_four_mode_quadrants_and_stitching():
    img = np.random.default_rng(2).random((250, 330), dtype=np.float32)
    model = Pointwise(size_divisor=16)
    out = predict_tiled(model, img, mode="four", autocast="fp32")
    assert model.calls == [(4, 1, 128, 176)]  # ceil(250/2)=125 -> 128, ceil(330/2)=165 -> 176
    np.testing.assert_allclose(out, full_image(img), atol=1e-4)
    breast = np.zeros(img.shape, bool)
    breast[200:, 10:20] = True  # bottom-left quadrant only
    model = Pointwise(size_divisor=16)
    out = predict_tiled(model, img, mode="four", breast_mask=breast, autocast="fp32")
    assert model.calls == [(1, 1, 128, 176)]
    assert (out[:, :128] == 0).all() and (out[:, :, 176:] == 0).all()
    np.testing.assert_allclose(out[:, 128:, :176], full_image(img)[:, 128:, :176], atol=1e-4)


def test_a_training_model_is_switched_to_eval_for_the_call_and_back():
    model = small_unet(depth=2).train()
    threads = torch.get_num_threads()
    img = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    predict_tiled(model, img, tile=64, autocast="fp32")
    assert model.training and torch.get_num_threads() == threads
    assert model.inc[0].weight.is_contiguous()  # the weights' memory format is the caller's


def test_a_call_changes_nothing_on_an_eval_model_or_the_process(monkeypatch):
    """Threads may share a model (a server's Predictor): a call must not switch its mode, convert
    its memory format or set torch's global thread count, even to restore them afterwards."""
    model = small_unet(depth=2).to(memory_format=torch.channels_last)  # eval, converted once by its owner
    img = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    expected = predict_tiled(model, img, tile=64, autocast="fp32")
    changes: list[str] = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: changes.append(f"set_num_threads({n})"))
    monkeypatch.setattr(model, "train", lambda mode=True: changes.append(f"train({mode})"))
    monkeypatch.setattr(model, "to", lambda *a, **k: changes.append(f"to({a}, {k})"))
    out = predict_tiled(model, img, tile=64, autocast="fp32")
    assert changes == [] and np.array_equal(out, expected)


def test_bad_arguments_are_one_line_errors():
    model = Pointwise(size_divisor=16)
    img = np.zeros((64, 64), np.float32)
    with pytest.raises(ConfigError, match="multiple of the model's size_divisor 16"):
        predict_tiled(model, img, tile=100)
    with pytest.raises(ConfigError, match="overlap"):
        predict_tiled(model, img, tile=64, overlap=1.0)
    with pytest.raises(ConfigError, match="tiling mode"):
        predict_tiled(model, img, tile=64, mode="grid")
    with pytest.raises(InputError, match="breast_mask: shape"):
        predict_tiled(model, img, tile=64, breast_mask=np.ones((10, 10), bool))
    with pytest.raises(InputError, match="NaN"):
        predict_tiled(model, np.full((64, 64), np.nan, np.float32), tile=64)
    with pytest.raises(ConfigError, match="move the model"):
        predict_tiled(model, img, tile=64, device="meta")
    with pytest.raises(InputError, match="float image"):
        predict_tiled(model, np.zeros((64, 64), np.uint16), tile=64)


@pytest.mark.slow
def test_bf16_agrees_with_fp32_on_a_mammogram():
    if not cpu_supports_bf16():
        pytest.skip("this CPU has no native bf16 (no AVX512-BF16 / AMX): autocast='auto' stays fp32 here")
    from mammocad.models import create_model
    from mammocad.synth import synthesize_mammogram

    torch.manual_seed(0)
    model = create_model("unet", in_channels=1, num_classes=1, base_channels=16, depth=4).eval()
    mg = synthesize_mammogram(np.random.default_rng(1), size=(512, 416))
    p32 = predict_tiled(model, mg.image, tile=256, breast_mask=mg.breast_mask, autocast="fp32")[0]
    p16 = predict_tiled(model, mg.image, tile=256, breast_mask=mg.breast_mask, autocast="auto")[0]
    assert p16.dtype == np.float32 and 0 < np.abs(p16 - p32).max() < 0.1  # bf16 did run, and is close
    # Threshold at the median of the breast: half the breast is "lesion", so every pixel whose
    # probability sits near the threshold can flip. Random-init logits still vary (std ~1).
    inside = mg.breast_mask
    thr = np.median(p32[inside])
    logits = np.log(p32[inside] / (1 - p32[inside]))
    assert logits.std() > 0.5
    differ = ((p32 >= thr) != (p16 >= thr))[inside].mean()
    assert differ <= 0.01
