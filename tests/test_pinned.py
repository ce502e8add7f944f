"""Tests that pin what other tests only claim: each one fails under a specific plausible mutation that
the rest of the suite let through (issue 6, point 5). The mutation each test catches is named in
its docstring."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import shared_path


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["RG3_RLE", "RG3_JPLL"])
def test_rg3_monochrome1_window_then_inversion(name):
    """Mutation caught: inversion applied BEFORE the VOI window. The RG3 files are MONOCHROME1 CR with
    an asymmetric window (centre 550, width 1024 on 10-bit data: [38, 1062], not centred on the data
    range), so the two orders give different values; DICOM PS3.3 C.11.2.1.2 applies the window to the
    modality values, then the MONOCHROME1 inversion to its output."""
    import pydicom

    from mammocad.io.dicom import read_dicom

    path = shared_path("dicom", "dicom-test-files", name)
    ds = pydicom.dcmread(path)
    stored = ds.pixel_array.astype(np.float64)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and float(ds.WindowCenter) == 550 and float(ds.WindowWidth) == 1024
    c, w = 550.0, 1024.0
    # PS3.3 C.11.2.1.2.1 LINEAR, output range [0, 1]
    windowed = np.clip((stored - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)
    expected = 1.0 - windowed
    got = read_dicom(path).pixels
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # and spot values, so a change of both the reader and this formula cannot pass unnoticed
    assert stored[880, 880] == 306 and got[880, 880] == pytest.approx(0.738025, abs=1e-5)
    inverted_first = np.clip(((1023 - 306) - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    assert abs(inverted_first - got[880, 880]) > 0.05


def test_prepared_lesion_mask_keeps_pixels_at_least_half_covered():
    """Mutation caught: the binarisation threshold of ``prepare``'s lesion masks changed (``>= 128`` on
    the 0/255 resize to ``> 128``, ``>= 64``, ``>= 192``, ...). The documented rule is the one of
    ``Geometry.forward_array(kind="mask")``: a prepared pixel is lesion when at least half of it is."""
    from mammocad.datasets.prepare_run import _map_mask
    from mammocad.preprocess.geometry import Geometry

    geometry = Geometry((8, 8)).resize(4, 4)  # each prepared pixel is a 2x2 block of source pixels
    src = np.zeros((8, 8), dtype=bool)
    src[0, 0] = True  # block (0, 0): 1 of 4 pixels
    src[0, 2:4] = True  # block (0, 1): 2 of 4
    src[0, 4:6] = True
    src[1, 4] = True  # block (0, 2): 3 of 4
    src[0:2, 6:8] = True  # block (0, 3): 4 of 4
    mask, lost = _map_mask(src, geometry, 0, [])
    assert lost is None
    assert mask[0].tolist() == [False, True, True, True] and not mask[1:].any()

    rng = np.random.default_rng(0)
    blob = rng.random((300, 200)) < 0.5
    geometry = Geometry((300, 200)).resize(90, 60)
    mask, _ = _map_mask(blob, geometry, 0, [])
    cover = geometry.forward_array(blob.astype(np.float32), kind="image")
    # 0/255 uint8 resizing rounds a fraction within 1/255 of one half either way; elsewhere: the rule
    decided = np.abs(cover - 0.5) > 1.0 / 255
    np.testing.assert_array_equal(mask[decided], cover[decided] >= 0.5)
    assert decided.mean() > 0.9


def _ring(shape, lo, hi) -> np.ndarray:
    """Square outline rows/cols lo..hi inclusive: its centroid is at its centre, which it does not cover."""
    m = np.zeros(shape, dtype=bool)
    m[lo:hi + 1, [lo, hi]] = True
    m[[lo, hi], lo:hi + 1] = True
    return m


@pytest.mark.parametrize("lo, hi, inside, outside", [
    # indices 10..31: mean index 20.5, centroid 21.0 in pixel-edge coordinates -> pixel 21 (floor)
    (10, 31, (21, 21), (20, 20)),
    # indices 10..30: mean index 20, centroid 20.5 (the centre of pixel 20)
    (10, 30, (20, 20), (21, 21)),
])
def test_centroid_rule_has_no_half_pixel_shift(lo, hi, inside, outside):
    """Mutation caught: the centroid rule shifted by half a pixel (``floor(mean)`` or ``round(mean)``
    instead of ``floor(mean + 0.5)``, or ``+ 1``). The ring shares no pixel with the one-pixel lesion,
    so only the centroid rule can make a hit."""
    from mammocad.evaluation.lesion_detection import component_hits
    from mammocad.records import LesionComponent

    shape = (48, 48)
    comp = LesionComponent.from_mask(_ring(shape, lo, hi), 0.9)
    hit = np.zeros(shape, dtype=bool)
    hit[inside] = True
    miss = np.zeros(shape, dtype=bool)
    miss[outside] = True
    assert component_hits(comp, hit) and not component_hits(comp, miss)


def test_a_lesion_keeps_its_best_hit_score():
    """Mutation caught: a lesion keeping the score of its LAST hitting component instead of its best
    (``lesion_scores[j] = c.score``). Components are visited highest score first in the code, so the
    test feeds them lowest first, and checks the FROC threshold that detects the lesion."""
    from mammocad.evaluation.lesion_detection import DetectionImage, evaluate_lesion_detection
    from mammocad.records import LesionComponent

    shape = (64, 64)
    lesion = np.zeros(shape, dtype=bool)
    lesion[20:40, 20:40] = True
    weak, strong = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)
    weak[22:30, 22:30] = True
    strong[30:38, 30:38] = True
    for order in ((0.3, 0.8), (0.8, 0.3)):
        comps = [LesionComponent.from_mask(weak if s == 0.3 else strong, s) for s in order]
        report = evaluate_lesion_detection([DetectionImage("c", "p", shape, [lesion], comps)], n_boot=0)
        assert [(p.threshold, p.sensitivity) for p in report.froc] == [(0.8, 1.0)], order
        assert report.sensitivity_at_1fp.value == 1.0


def test_bundle_holds_the_best_epochs_weights_not_the_last(tmp_path, monkeypatch):
    """Mutation caught: the bundle keeping the LAST epoch's weights instead of the best validated
    ones. Validation is replaced by a fixed score sequence (best at epoch 2 of 3) that also records
    the weights it saw; the bundle must hold exactly epoch 2's."""
    import torch
    from safetensors.torch import load_file

    from mammocad.tasks import ValidationResult
    from mammocad.tasks import segment
    from mammocad.training.config import load_config, with_overrides
    from mammocad.training.engine import train

    from tiny_prepared import make_tiny_prepared, write_config

    make_tiny_prepared(tmp_path)
    scores = iter([0.2, 0.9, 0.1])
    seen: list[dict[str, torch.Tensor]] = []

    def fixed_validation(self, model):
        seen.append({k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
        return ValidationResult(score=next(scores), metrics={"val_loss": 1.0, "val_dice": 0.0, "val_iou": 0.0})

    monkeypatch.setattr(segment.SegmentTraining, "validate", fixed_validation)
    cfg = with_overrides(load_config(write_config(tmp_path, "best.yaml", train={"patience": 10, "tensorboard": False})),
                         epochs=3)
    result = train(cfg, tmp_path / "run", progress=False)
    assert len(seen) == 3 and result.best_val_dice == pytest.approx(0.9)
    bundle = load_file(str(tmp_path / "run" / "bundle" / "model.safetensors"))
    best, last = seen[1], seen[2]
    assert any(not torch.equal(best[k], last[k]) for k in best)  # training moved the weights after epoch 2
    for k, v in bundle.items():
        torch.testing.assert_close(v.float(), best[k].float(), rtol=0, atol=0)
