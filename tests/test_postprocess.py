import numpy as np
import pytest

from mammocad.errors import ConfigError, InputError
from mammocad.inference.postprocess import lesions_to_original, union_mask_original
from mammocad.preprocess.geometry import Geometry
from mammocad.tasks.segment_lesions import probability_to_lesions, top_fraction_mean


def binary_map() -> np.ndarray:
    p = np.full((1, 120, 160), 0.05, np.float32)
    p[0, 10:30, 20:60] = 0.7  # rows 10..29, cols 20..59
    p[0, 50:90, 100:130] = 0.9
    p[0, 100:103, 5:8] = 0.95  # 9 pixels: under min_area
    return p


def test_components_boxes_areas_scores():
    comps = probability_to_lesions(binary_map(), threshold=0.5, min_area=16)
    assert [c.box for c in comps] == [(100, 50, 130, 90), (20, 10, 60, 30)]  # highest score first
    assert [c.area for c in comps] == [40 * 30, 20 * 40]
    assert [c.score for c in comps] == pytest.approx([0.9, 0.7])
    assert [c.label for c in comps] == ["lesion", "lesion"] and comps[0].class_probabilities == {}
    assert comps[1].mask.mask.shape == (20, 40) and comps[1].mask.mask.all()
    full = comps[1].mask.full()
    assert full.shape == (120, 160) and full.sum() == 800 and full[10:30, 20:60].all()
    assert comps[1].mask.box == comps[1].box
    assert len(probability_to_lesions(binary_map(), min_area=9)) == 3
    assert probability_to_lesions(binary_map(), threshold=0.99) == []


def test_score_is_mean_of_top_tenth():
    vals = np.arange(1, 101, dtype=np.float32) / 100  # top 10 values: 0.91..1.00
    assert top_fraction_mean(vals) == pytest.approx(0.955)
    assert top_fraction_mean(np.array([0.3], np.float32)) == pytest.approx(0.3)
    p = np.zeros((1, 40, 40), np.float32)
    p[0, 5:15, 5:15] = vals.reshape(10, 10)
    (comp,) = probability_to_lesions(p, threshold=0.5, min_area=1)
    assert comp.area == 51 and comp.score == pytest.approx(np.mean(np.arange(96, 101) / 100))


def test_eight_connectivity_breast_mask_and_hole_filling():
    p = np.zeros((1, 60, 60), np.float32)
    p[0, 10:20, 10:20] = 0.8
    p[0, 20:30, 20:30] = 0.8  # touches the first square at one corner only
    (comp,) = probability_to_lesions(p, min_area=1)
    assert comp.box == (10, 10, 30, 30) and comp.area == 200
    breast = np.zeros((60, 60), bool)
    breast[:, :20] = True
    (inside,) = probability_to_lesions(p, min_area=1, breast_mask=breast)
    assert inside.box == (10, 10, 20, 20)
    ring = np.zeros((1, 60, 60), np.float32)
    ring[0, 30:50, 30:50] = 0.9
    ring[0, 35:45, 35:45] = 0.0
    assert probability_to_lesions(ring, min_area=1)[0].area == 400 - 100
    assert probability_to_lesions(ring, min_area=1, fill_holes=True)[0].area == 400


def test_three_class_labels_and_probabilities():
    p = np.zeros((3, 80, 80), np.float32)
    p[0] = 1.0
    p[:, 10:30, 10:30] = np.array([0.1, 0.6, 0.3], np.float32)[:, None, None]
    p[:, 50:70, 40:75] = np.array([0.2, 0.2, 0.6], np.float32)[:, None, None]
    comps = probability_to_lesions(p, min_area=1)
    by_box = {c.box: c for c in comps}
    benign, malignant = by_box[(10, 10, 30, 30)], by_box[(40, 50, 75, 70)]
    assert benign.label == "benign" and malignant.label == "malignant"
    assert benign.class_probabilities == pytest.approx({"benign": 0.6 / 0.9, "malignant": 0.3 / 0.9})
    assert malignant.class_probabilities == pytest.approx({"benign": 0.25, "malignant": 0.75})
    assert benign.score == pytest.approx(0.9) and malignant.score == pytest.approx(0.8)
    assert [c.box for c in comps] == [(10, 10, 30, 30), (40, 50, 75, 70)]


def test_mapping_back_through_flip_crop_resize():
    h, w = 300, 400
    truth = np.zeros((h, w), bool)
    truth[100:160, 250:330] = True  # box [250, 100, 330, 160]
    geo = Geometry((h, w)).flip().crop(20, 10, 380, 290).resize(100, 128)  # scale 2.8 x 2.81
    prepared = geo.forward_array(truth, kind="mask")
    prob = np.where(prepared, 0.9, 0.02).astype(np.float32)[None]
    comps = probability_to_lesions(prob, min_area=4)
    assert len(comps) == 1
    (lesion,) = lesions_to_original(comps, geo)
    mask = lesion.mask
    scale = max(w - 40, 360) / 128
    assert np.allclose(lesion.box, (250, 100, 330, 160), atol=scale)
    full = mask.full()
    iou = (full & truth).sum() / (full | truth).sum()
    assert iou >= 0.95
    assert lesion.area == full.sum() and abs(lesion.area - truth.sum()) / truth.sum() < 0.1
    assert lesion.score == pytest.approx(0.9) and lesion.label == "lesion"
    union = union_mask_original([lesion], (h, w))
    assert (union == full).all()


def test_mapping_through_pad_resize_drops_lesions_on_padding():
    geo = Geometry((50, 60)).pad(top=0, bottom=14, left=0, right=4).resize(32, 32)  # 64x64 -> 32x32
    p = np.zeros((3, 32, 32), np.float32)
    p[0] = 1
    p[:, 4:10, 4:8] = np.array([0.1, 0.8, 0.1], np.float32)[:, None, None]
    p[:, 4:10, 8:12] = np.array([0.1, 0.1, 0.8], np.float32)[:, None, None]  # touches the first one
    p[:, 28:32, 10:20] = np.array([0.0, 0.0, 1.0], np.float32)[:, None, None]  # on the bottom padding only
    comps = probability_to_lesions(p, min_area=1)
    assert len(comps) == 2  # the two touching regions are one component (one lesion)
    mapped = lesions_to_original(comps, geo)
    assert len(mapped) == 1  # the one drawn on padding is dropped
    lesion, mask = mapped[0], mapped[0].mask
    assert lesion.box == (8.0, 8.0, 24.0, 20.0) and lesion.area == 16 * 12
    assert lesion.class_probabilities == pytest.approx({"benign": 0.5, "malignant": 0.5})
    assert mask.image_size == (50, 60)


def test_bad_inputs():
    with pytest.raises(InputError, match="expected \\(C, H, W\\)"):
        probability_to_lesions(np.zeros((10, 10), np.float32))
    with pytest.raises(ConfigError, match="2 names for 3"):
        probability_to_lesions(np.zeros((3, 10, 10), np.float32), class_names=("a", "b"))
    with pytest.raises(ConfigError, match="give the 4 class names"):
        probability_to_lesions(np.zeros((4, 10, 10), np.float32))
    with pytest.raises(InputError, match="NaN"):
        probability_to_lesions(np.full((1, 10, 10), np.nan, np.float32))
    with pytest.raises(InputError, match="breast_mask"):
        probability_to_lesions(np.zeros((1, 10, 10), np.float32), breast_mask=np.ones((5, 5), bool))
    with pytest.raises(ConfigError, match="threshold must be in"):
        probability_to_lesions(np.zeros((1, 10, 10), np.float32), threshold=0.0)
    comps = probability_to_lesions(binary_map())
    with pytest.raises(InputError, match="lesion mask on a .* grid"):
        lesions_to_original(comps, Geometry((50, 50)))


def test_lesions_to_prepared_inverts_lesions_to_original():
    from mammocad.inference.postprocess import lesions_to_prepared

    h, w = 300, 400
    geo = Geometry((h, w)).flip().crop(20, 10, 380, 290).resize(100, 128)
    prob = np.zeros((1, 100, 128), np.float32)
    prob[0, 20:40, 30:60] = 0.9
    prob[0, 60:70, 90:100] = 0.7
    comps = probability_to_lesions(prob, min_area=4)
    back = lesions_to_prepared(lesions_to_original(comps, geo), geo)
    assert [c.score for c in back] == [c.score for c in comps] and [c.label for c in back] == ["lesion"] * 2
    for c, b in zip(comps, back):  # original -> prepared by nearest neighbour: the same pixels, up to the rim
        orig, mapped = c.mask.full(), b.mask.full()
        assert (orig & mapped).sum() / (orig | mapped).sum() > 0.9 and b.area == mapped.sum()
        assert b.box == b.mask.box and b.mask.image_size == (100, 128)
    # a lesion in the part preprocessing cropped away is dropped
    from mammocad.records import CroppedMask, PredictedLesion

    corner = np.zeros((h, w), bool)
    corner[0:5, 0:8] = True
    outside = PredictedLesion(box=(0, 0, 8, 5), score=0.5, area=40.0, mask=CroppedMask.from_full(corner))
    assert lesions_to_prepared([outside], geo) == []
    with pytest.raises(InputError, match="no mask"):
        lesions_to_prepared([PredictedLesion(box=(0, 0, 1, 1), score=0.5)], geo)


def test_overlapping_instances_keep_their_whole_masks_both_ways():
    """Detection instances overlap (a lesion inside a larger false positive's mask). Each must keep
    every pixel through the Geometry both ways: one shared label map let the later instance take
    the shared pixels (a detector's best instance came back with 14 of its 3526 pixels)."""
    from mammocad.inference.postprocess import disjoint_layers, lesions_to_prepared
    from mammocad.records import CroppedMask, LesionComponent

    g = Geometry((100, 80)).crop(10, 0, 70, 100).resize(120, 72)
    size = tuple(g.size)
    big, small = np.zeros(size, bool), np.zeros(size, bool)
    big[10:90, 10:60] = True
    small[30:50, 20:40] = True
    comps = [LesionComponent.from_mask(small, 0.9), LesionComponent.from_mask(big, 0.4)]
    assert disjoint_layers([c.mask for c in comps], size) == [[0], [1]]
    back = lesions_to_original(comps, g)
    assert len(back) == 2
    forth = lesions_to_prepared(back, g)
    for comp, mapped in zip(comps, forth):
        a, b = comp.mask.full(), mapped.mask.full()
        assert (a & b).sum() / (a | b).sum() > 0.9  # the inner instance kept its pixels
    disjoint = [LesionComponent.from_mask(small, 0.9), LesionComponent.from_mask(np.roll(small, 40, axis=0), 0.5)]
    assert disjoint_layers([c.mask for c in disjoint], size) == [[0, 1]]  # segmentation components: one map
    with pytest.raises(InputError, match="grid"):
        disjoint_layers([CroppedMask(np.ones((2, 2), bool), 0, 0, (5, 5))], size)
