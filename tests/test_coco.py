"""COCO adapter: polygons, multi-part, RLE, bbox-only, crowd, images without annotations, errors, real BUSI masks."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import shared_path
from mammocad.datasets.coco import mask_outlines, read_coco
from mammocad.datasets.rasterize import rasterize_lesion
from mammocad.datasets.registry import read_cases
from mammocad.errors import AnnotationError, ConfigError, InputError
from mammocad.records import Lesion

H, W = 80, 100
CATEGORIES = [{"id": 1, "name": "benign"}, {"id": 2, "name": "Malignant"}, {"id": 3, "name": "cyst", "supercategory": "lesion"}]


def write_image(path: Path, h: int = H, w: int = W) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((h, w), 40, dtype=np.uint8))
    return path


def circle_polygon(cx: float, cy: float, r: float, n: int = 128) -> list[float]:
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.column_stack([cx + r * np.cos(a), cy + r * np.sin(a)]).ravel().round(3).tolist()


def coco_dataset(tmp_path: Path) -> Path:
    for name in ("p1.png", "p2.png", "p3.png", "p4.png"):
        write_image(tmp_path / "images" / name)
    data = {
        "images": [
            {"id": 1, "file_name": "p1.png", "width": W, "height": H, "patient_id": "PAT-1"},
            {"id": 2, "file_name": "p2.png", "width": W, "height": H},
            {"id": 3, "file_name": "p3.png", "width": W, "height": H},
            {"id": 4, "file_name": "p4.png", "width": W, "height": H},
            {"id": 5, "file_name": "missing.png", "width": W, "height": H},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [10, 10, 10, 20],
             "segmentation": [[10, 10, 20, 10, 20, 30, 10, 30]]},
            {"id": 11, "image_id": 1, "category_id": 2, "iscrowd": 0, "bbox": [40, 20, 20, 20],
             "segmentation": [circle_polygon(50, 30, 10), [70, 60, 74, 60, 74, 62, 70, 62]]},
            {"id": 20, "image_id": 2, "category_id": 3, "iscrowd": 0, "bbox": [5, 6, 30, 15]},
            {"id": 21, "image_id": 2, "category_id": 1, "iscrowd": 1, "bbox": [0, 0, 50, 50],
             "segmentation": {"counts": [0, 100, 7900], "size": [H, W]}},
            {"id": 30, "image_id": 3, "category_id": 2, "iscrowd": 1, "bbox": [0, 0, 5, 5], "segmentation": []},
            {"id": 99, "image_id": 77, "category_id": 1, "bbox": [0, 0, 5, 5]},
        ],
        "categories": CATEGORIES,
    }
    (tmp_path / "instances.json").write_text(json.dumps(data))
    return tmp_path


def test_coco_polygons_bbox_crowd_and_empty_images(tmp_path, caplog):
    coco_dataset(tmp_path)
    with caplog.at_level(logging.WARNING):
        cases = read_cases("coco", tmp_path)
    assert [(c.case_id, c.patient_id, c.label, c.modality, len(c.lesions)) for c in cases] == [
        ("p1", "PAT-1", "malignant", "MG", 2),
        ("p2", "p2", "unknown", "MG", 1),
        ("p3", "p3", "unknown", "MG", 0),  # its only annotation was a crowd region: not proven normal
        ("p4", "p4", "normal", "MG", 0),
    ]
    assert cases[0].image_path == str((tmp_path / "images" / "p1.png").absolute())
    assert cases[0].attributes["patient_id_from"] == "image field 'patient_id'"
    assert cases[2].attributes["skipped_annotations"] == 1

    rect, disc = cases[0].lesions
    assert rect.polygon == [(10.0, 10.0), (20.0, 10.0), (20.0, 30.0), (10.0, 30.0)]
    assert (rect.pathology, rect.source_label, rect.attributes["coco_annotation_id"]) == ("benign", "benign", 10)
    assert rasterize_lesion(rect, (H, W)).sum() == 200
    # Two parts: the outline is the larger (the disc), both parts are kept in the attributes.
    assert (disc.pathology, disc.source_label, disc.attributes["coco_parts"]) == ("malignant", "Malignant", 2)
    assert len(disc.polygon) == 128 and len(disc.attributes["coco_segmentation"]) == 2
    assert rasterize_lesion(disc, (H, W)).sum() == pytest.approx(math.pi * 100, rel=0.03)

    (box,) = cases[1].lesions
    assert box.box == (5.0, 6.0, 35.0, 21.0) and box.polygon is None
    assert (box.pathology, box.source_label) == ("unknown", "cyst")
    assert rasterize_lesion(box, (H, W)).sum() == 450

    log = caplog.text
    assert "annotation 11 has 2 separate parts" in log
    assert "annotation 21 on p2.png is a crowd region; skipped" in log
    assert "annotation 30 on p3.png is a crowd region" in log
    assert "image id 77, which is not in 'images'" in log
    assert "missing.png not found" in log


def test_coco_rle_is_traced_exactly_and_json_found_in_annotations_folder(tmp_path):
    coco_mask = pytest.importorskip("pycocotools.mask")
    write_image(tmp_path / "images" / "r.png")
    mask = np.zeros((H, W), dtype=np.uint8)
    cv2.circle(mask, (30, 40), 12, 1, -1)
    mask[5:9, 80:95] = 1
    rle = coco_mask.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode("ascii")
    data = {"images": [{"id": 1, "file_name": "r.png"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "iscrowd": 0, "segmentation": rle}],
            "categories": CATEGORIES}
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "train.json").write_text(json.dumps(data))
    (case,) = read_coco(tmp_path, modality="US", dataset="mine")
    assert (case.dataset, case.modality, case.label) == ("mine", "US", "unknown")
    (les,) = case.lesions
    assert les.attributes["coco_segmentation"] == rle and les.attributes["coco_parts"] == 2
    disc = mask.copy()
    disc[5:9, 80:95] = 0
    assert np.array_equal(rasterize_lesion(les, (H, W)), disc.astype(bool))


def test_mask_outlines_refill_to_the_same_pixels():
    mask = np.zeros((30, 40), dtype=bool)
    mask[3:10, 5:9] = True
    mask[10, 12] = True  # a single pixel
    mask[20:28, 20:35] = True
    mask[22:25, 24:30] = False  # a hole: outlines are outer boundaries, so it is filled
    outlines = mask_outlines(mask)
    assert len(outlines) == 3
    filled = [rasterize_lesion(Lesion(polygon=p), mask.shape) for p in outlines]
    assert [int(f.sum()) for f in filled] == [120, 28, 1]
    without_hole = mask.copy()
    without_hole[22:25, 24:30] = True
    assert np.array_equal(np.logical_or.reduce(filled), without_hole)


def test_coco_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [1, 2,]}')
    with pytest.raises(AnnotationError, match=r"bad\.json: malformed JSON"):
        read_coco(tmp_path)
    bad.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(AnnotationError, match=r"bad\.json: no 'annotations' list"):
        read_coco(tmp_path)
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "nowhere.png"}], "annotations": [], "categories": []}))
    with pytest.raises(AnnotationError, match=r"bad\.json: no usable images"):
        read_coco(tmp_path)
    with pytest.raises(InputError, match=r"nope\.json: annotation JSON not found"):
        read_coco(tmp_path, json="nope.json")
    with pytest.raises(ConfigError, match="unknown option"):
        read_coco(tmp_path, class_attribute="x")


BUSI_MASKS = {
    "benign/benign (16).png": ["benign/benign (16)_mask.png"],
    "benign/benign (25).png": ["benign/benign (25)_mask.png", "benign/benign (25)_mask_1.png"],
    "malignant/malignant (1).png": ["malignant/malignant (1)_mask.png"],  # 90993 px + two 1-px specks
}


@pytest.mark.realdata
def test_coco_polygons_traced_from_real_busi_masks(tmp_path):
    busi = shared_path("busi")
    images, annotations, truth = [], [], {}
    for image_id, (image, mask_files) in enumerate(BUSI_MASKS.items(), start=1):
        masks = [cv2.imread(str(busi / m), cv2.IMREAD_GRAYSCALE) > 0 for m in mask_files]
        truth[Path(image).stem] = np.logical_or.reduce(masks)
        h, w = masks[0].shape
        images.append({"id": image_id, "file_name": image, "width": w, "height": h})
        for mask in masks:  # one annotation per lesion; every connected part is one polygon
            up = cv2.resize(mask.astype(np.uint8), None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
            contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            seg = [((c[:, 0, :] + 0.5) / 2).ravel().tolist() for c in contours]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0, "segmentation": seg,
                                "category_id": 1 if image.startswith("benign") else 2, "bbox": list(cv2.boundingRect(mask.astype(np.uint8)))})
    (tmp_path / "busi_coco.json").write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))

    cases = read_coco(tmp_path, image_dir=str(busi), modality="US")
    assert [(c.case_id, c.label, [les.pathology for les in c.lesions]) for c in cases] == [
        ("benign (16)", "benign", ["benign"]), ("benign (25)", "benign", ["benign", "benign"]),
        ("malignant (1)", "malignant", ["malignant"])]
    ious = []
    for case in cases:
        mask = truth[case.case_id]
        drawn = np.logical_or.reduce([rasterize_lesion(les, mask.shape) for les in case.lesions])
        ious.append((drawn & mask).sum() / (drawn | mask).sum())
    assert min(ious) >= 0.95, ious
    # malignant (1) keeps only its largest part: the two 1-pixel specks are the whole difference.
    assert ious[2] == pytest.approx(90993 / 90995)
    assert cases[2].lesions[0].attributes["coco_parts"] == 3


def test_image_paths_leaving_the_image_folder_are_refused_unless_allowed(tmp_path):
    """An absolute or `../` file_name reads a file outside the dataset: refused, the JSON and the
    path named, unless allow_outside_root (a string from -o, as the CLI gives it) (issue 6)."""
    outside = write_image(tmp_path / "elsewhere" / "x.png")
    root = tmp_path / "data"
    write_image(root / "images" / "ok.png")
    for file_name in (str(outside), "../elsewhere/x.png", "../../elsewhere/x.png"):
        data = {"images": [{"id": 1, "file_name": "ok.png"}, {"id": 2, "file_name": file_name}],
                "annotations": [], "categories": CATEGORIES}
        (root / "instances.json").write_text(json.dumps(data))
        with pytest.raises(AnnotationError, match=rf"^{root / 'instances.json'}: path '{file_name}' leads outside"):
            read_coco(root)
        for word in ("true", "1", "yes"):
            cases = read_cases("coco", root, allow_outside_root=word)
            assert [Path(c.image_path).resolve() for c in cases] == [(root / "images" / "ok.png").resolve(), outside.resolve()]
    with pytest.raises(ConfigError, match="allow_outside_root"):
        read_coco(root, allow_outside_root="sometimes")
    # Inside the folder it is fine, even written absolute or with a detour.
    data["images"][1]["file_name"] = str(root / "images" / "ok.png")
    data["images"].append({"id": 3, "file_name": "../images/ok.png"})  # from images/ back into images/
    (root / "instances.json").write_text(json.dumps(data))
    assert len(read_coco(root)) == 3
