"""VIA adapter: VIA 1.x and 2.x files, every shape, labels, errors, and polygons traced from real BUSI masks."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import shared_path
from mammocad.datasets.rasterize import rasterize_lesion
from mammocad.datasets.registry import read_cases
from mammocad.datasets.via import ellipse_polygon, pathology_from_word, read_via
from mammocad.errors import AnnotationError, ConfigError, InputError

H, W = 100, 120


def write_image(path: Path, h: int = H, w: int = W) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = (np.arange(h * w, dtype=np.uint32).reshape(h, w) % 251).astype(np.uint8)
    assert cv2.imwrite(str(path), img)
    return path


def region(shape: dict, **attrs) -> dict:
    return {"shape_attributes": shape, "region_attributes": attrs}


POLYGON = {"name": "polygon", "all_points_x": [10, 40, 40, 10], "all_points_y": [10, 10, 30, 30]}  # 30x20 square
CIRCLE = {"name": "circle", "cx": 60, "cy": 50, "r": 10}
RECT = {"name": "rect", "x": 5, "y": 60, "width": 10, "height": 20}
ELLIPSE = {"name": "ellipse", "cx": 70, "cy": 50, "rx": 20, "ry": 10, "theta": math.pi / 6}


def via2_project(tmp_path: Path) -> Path:
    for name in ("a.png", "b.png", "c.png"):
        write_image(tmp_path / name)
    meta = {
        "a.png1234": {"filename": "a.png", "size": 1234, "file_attributes": {}, "regions": [
            region(POLYGON, **{"class": "Benign"}),
            region(CIRCLE, **{"class": "M"}),
            region(RECT, **{"class": "cyst"}),
            region({"name": "point", "cx": 3, "cy": 4}, **{"class": "benign"}),
            region({"name": "polyline", "all_points_x": [1, 2], "all_points_y": [1, 2]}),
        ]},
        "b.png99": {"filename": "b.png", "size": 99, "file_attributes": {}, "regions": [region(ELLIPSE, label="malignant mass")]},
        "c.png1": {"filename": "c.png", "size": 1, "file_attributes": {}, "regions": []},
        "gone.png5": {"filename": "gone.png", "size": 5, "file_attributes": {}, "regions": [region(CIRCLE)]},
    }
    project = {"_via_settings": {}, "_via_img_metadata": meta, "_via_attributes": {"region": {}, "file": {}}}
    path = tmp_path / "project.json"
    path.write_text(json.dumps(project))
    return path


def test_via2_project_shapes_labels_and_areas(tmp_path, caplog):
    via2_project(tmp_path)
    with caplog.at_level(logging.WARNING):
        cases = read_cases("via", tmp_path)
    assert [c.case_id for c in cases] == ["a", "b", "c"]
    assert [c.patient_id for c in cases] == ["a", "b", "c"]
    assert all(c.attributes["patient_id_from"] == "image stem" for c in cases)
    assert [c.modality for c in cases] == ["US"] * 3
    assert [c.label for c in cases] == ["malignant", "malignant", "normal"]
    assert cases[0].image_path == str((tmp_path / "a.png").absolute())

    poly, circle, rect = cases[0].lesions
    assert poly.polygon == [(10.0, 10.0), (40.0, 10.0), (40.0, 30.0), (10.0, 30.0)]
    assert (poly.pathology, poly.source_label) == ("benign", "Benign")
    assert circle.circle == (60.0, 50.0, 10.0) and circle.pathology == "malignant" and circle.source_label == "M"
    assert rect.box == (5.0, 60.0, 15.0, 80.0) and rect.pathology == "unknown" and rect.source_label == "cyst"
    assert rasterize_lesion(poly, (H, W)).sum() == 600
    assert rasterize_lesion(rect, (H, W)).sum() == 200
    assert rasterize_lesion(circle, (H, W)).sum() == pytest.approx(math.pi * 100, rel=0.03)

    (ell,) = cases[1].lesions
    assert (ell.pathology, ell.kind, ell.source_label) == ("malignant", "mass", "malignant mass")
    assert ell.attributes["via_shape"] == "ellipse"
    mask = rasterize_lesion(ell, (H, W))
    assert mask.sum() == pytest.approx(math.pi * 20 * 10, rel=0.03)
    # The long axis points along theta (30 degrees, clockwise on screen as VIA draws it).
    m = cv2.moments(mask.astype(np.uint8), binaryImage=True)
    angle = 0.5 * math.atan2(2 * m["mu11"], m["mu20"] - m["mu02"])
    assert angle == pytest.approx(math.pi / 6, abs=0.02)
    assert m["m10"] / m["m00"] == pytest.approx(70.0 - 0.5, abs=0.1)  # centroid in pixel-index coordinates

    warnings = caplog.text
    assert "region 3 skipped" in warnings and "'point' has no area" in warnings
    assert "region 4 skipped" in warnings and "'polyline'" in warnings
    assert "gone.png not found" in warnings


def test_via1_region_data_with_file_labels_and_patient_attribute(tmp_path):
    # Balloon-style VIA 1.x export: regions are an object keyed "0", "1", ...; ellipses have no theta.
    write_image(tmp_path / "imgs" / "us1.png")
    write_image(tmp_path / "imgs" / "us2.png")
    write_image(tmp_path / "imgs" / "us3.png")
    data = {
        "us1.png2000": {"fileref": "", "size": 2000, "filename": "us1.png", "base64_img_data": "",
                        "file_attributes": {"diagnosis": "Malignant", "pid": "P7"},
                        "regions": {"0": {"shape_attributes": {"name": "ellipse", "cx": 50, "cy": 40, "rx": 20, "ry": 10},
                                          "region_attributes": {}}}},
        "us2.png10": {"fileref": "", "size": 10, "filename": "us2.png", "base64_img_data": "",
                      "file_attributes": {"diagnosis": "benign", "pid": "P7"},
                      "regions": {"1": {"shape_attributes": RECT, "region_attributes": {"lesion_type": "x"}},
                                  "0": {"shape_attributes": POLYGON, "region_attributes": {"lesion_type": "B"}}}},
        "us3.png11": {"fileref": "", "size": 11, "filename": "us3.png", "base64_img_data": "",
                      "file_attributes": {"diagnosis": "normal"}, "regions": {}},
    }
    (tmp_path / "via_region_data.json").write_text(json.dumps(data))
    cases = read_via(tmp_path, image_dir="imgs", class_attribute="lesion_type", patient_attribute="pid", modality="MG")
    assert [(c.case_id, c.patient_id, c.label, c.modality) for c in cases] == [
        ("us1", "P7", "malignant", "MG"), ("us2", "P7", "benign", "MG"), ("us3", "us3", "normal", "MG")]
    assert cases[0].attributes["patient_id_from"] == "file attribute 'pid'"
    assert cases[2].attributes["patient_id_from"] == "image stem"
    (ell,) = cases[0].lesions
    assert ell.pathology == "malignant" and ell.attributes["pathology_from"] == "image label"
    assert rasterize_lesion(ell, (H, W)).sum() == pytest.approx(math.pi * 200, rel=0.03)
    # Regions are read in key order; "x" is no pathology but the benign image makes every lesion benign.
    poly, rect = cases[1].lesions
    assert poly.polygon[0] == (10.0, 10.0) and poly.source_label == "B" and poly.pathology == "benign"
    assert rect.box == (5.0, 60.0, 15.0, 80.0) and rect.source_label == "x" and rect.pathology == "benign"


def test_ellipse_polygon_vertex_count_and_words():
    assert len(ellipse_polygon(0, 0, 20, 10)) == 64
    assert len(ellipse_polygon(0, 0, 1000, 10)) == 281
    assert [pathology_from_word(w) for w in ("B", "m", "BENIGN_WITHOUT_CALLBACK", "Malignant", "non-malignant", "cyst", "")] == [
        "benign", "malignant", "benign", "malignant", "unknown", "unknown", "unknown"]


def test_via_errors_name_the_file(tmp_path, caplog):
    write_image(tmp_path / "a.png")
    bad = tmp_path / "broken.json"
    bad.write_text('{"a.png1": {"filename": "a.png", "regions": [}')
    with pytest.raises(AnnotationError, match=r"broken\.json: malformed JSON"):
        read_via(tmp_path)

    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(InputError, match=r"several JSON files \(broken\.json, other\.json\)"):
        read_via(tmp_path)
    with pytest.raises(AnnotationError, match=r"other\.json: no usable images"):
        read_via(tmp_path, json="other.json")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=r"empty: no \*\.json annotation file"):
        read_via(empty)

    v3 = tmp_path / "v3.json"
    v3.write_text(json.dumps({"project": {}, "config": {}, "attribute": {}, "file": {}, "metadata": {}, "view": {}}))
    with pytest.raises(AnnotationError, match=r"v3\.json: VIA 3 project files are not supported"):
        read_via(tmp_path, json="v3.json")

    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps({"a.png1": {"filename": "a.png", "size": 1, "file_attributes": {}, "regions": [
        region({"name": "squiggle"}), region({"name": "polygon", "all_points_x": [1, 2, 3], "all_points_y": [1, 2]}), region(CIRCLE)]}}))
    with caplog.at_level(logging.WARNING):
        (case,) = read_via(tmp_path, json="ok.json")
    assert [les.circle for les in case.lesions] == [(60.0, 50.0, 10.0)]
    assert "region 0 skipped: shape 'squiggle'" in caplog.text
    assert "region 1 skipped: polygon has 3 x and 2 y coordinates" in caplog.text

    with pytest.raises(ConfigError, match="modality"):
        read_via(tmp_path, json="ok.json", modality="CT")
    with pytest.raises(ConfigError, match="unknown option"):
        read_via(tmp_path, json="ok.json", jsn="ok.json")


def trace_outlines(mask: np.ndarray) -> list[list[tuple[float, float]]]:
    """What an annotator draws: the outline along the mask's pixel edges. findContours gives
    boundary pixel centres; on a 2x upsampling they sit 0.25 px inside the edges."""
    up = cv2.resize(mask.astype(np.uint8), None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [[((x + 0.5) / 2, (y + 0.5) / 2) for x, y in c[:, 0, :].tolist()] for c in contours]


BUSI_MASKS = {  # image -> its mask files (benign (25) has two lesions, malignant (1) has two 1-px specks)
    "benign/benign (16).png": ["benign/benign (16)_mask.png"],
    "benign/benign (25).png": ["benign/benign (25)_mask.png", "benign/benign (25)_mask_1.png"],
    "malignant/malignant (1).png": ["malignant/malignant (1)_mask.png"],
}


@pytest.mark.realdata
def test_via_polygons_traced_from_real_busi_masks(tmp_path):
    busi = shared_path("busi")
    meta, truth = {}, {}
    for image, mask_files in BUSI_MASKS.items():
        masks = [cv2.imread(str(busi / m), cv2.IMREAD_GRAYSCALE) > 0 for m in mask_files]
        truth[Path(image).stem] = np.logical_or.reduce(masks)
        regions = [region({"name": "polygon", "all_points_x": [p[0] for p in poly], "all_points_y": [p[1] for p in poly]},
                          type=image.split("/")[0]) for m in masks for poly in trace_outlines(m)]
        meta[image + str((busi / image).stat().st_size)] = {"filename": image, "size": (busi / image).stat().st_size,
                                                            "file_attributes": {}, "regions": regions}
    (tmp_path / "busi_via.json").write_text(json.dumps({"_via_img_metadata": meta}))

    cases = read_via(tmp_path, image_dir=str(busi))
    assert [(c.case_id, c.label, len(c.lesions)) for c in cases] == [
        ("benign (16)", "benign", 1), ("benign (25)", "benign", 2), ("malignant (1)", "malignant", 3)]
    for case in cases:
        assert Path(case.image_path) == busi / f"{case.label}/{case.case_id}.png"
        mask = truth[case.case_id]
        drawn = np.logical_or.reduce([rasterize_lesion(les, mask.shape) for les in case.lesions])
        iou = (drawn & mask).sum() / (drawn | mask).sum()
        assert iou >= 0.95, (case.case_id, iou)
    assert mask.sum() == 90995  # malignant (1): lesion pixels as listed in busi/images.csv


def test_adapters_share_the_helpers_of_datasets_common():
    from mammocad.datasets import busi, cbis_ddsm, coco, common, folder, mias, via

    for module, names in ((via, ("check_options", "pathology_from_word", "image_label_from_word", "kind_from_word",
                                 "load_json", "find_json", "parse_modality", "resolve_dir", "unique_case_id", "inherit_pathology")),
                          (coco, ("check_options", "find_json", "kind_from_word", "load_json", "parse_modality",
                                  "pathology_from_word", "resolve_dir", "unique_case_id")),
                          (folder, ("check_options", "image_label_from_word", "inherit_pathology", "parse_modality", "pathology_from_word")),
                          (cbis_ddsm, ("check_options",)), (mias, ("check_options",)), (busi, ("check_options",))):
        for name in names:
            assert getattr(module, name) is getattr(common, name), (module.__name__, name)
    with pytest.raises(ConfigError, match=r"^x: unknown option\(s\) b; known: a, c$"):
        common.check_options("x", {"a": 1, "b": 2}, iter(("c", "a")))
    with pytest.raises(ConfigError, match=r"^x: unknown option\(s\) b; the x adapter takes no options$"):
        common.check_options("x", {"b": 2}, ())


def test_image_paths_leaving_the_image_folder_are_refused_unless_allowed(tmp_path):
    """An absolute or `../` filename would read a file outside the dataset: refused, the JSON and the
    path named, unless allow_outside_root (issue 6)."""
    outside = write_image(tmp_path / "elsewhere" / "x.png")
    root = tmp_path / "data"
    write_image(root / "ok.png")
    for filename in (str(outside), "../elsewhere/x.png"):
        meta = {"ok": {"filename": "ok.png", "regions": [region(CIRCLE)]},
                "x": {"filename": filename, "regions": [region(CIRCLE)]}}
        (root / "via.json").write_text(json.dumps({"_via_img_metadata": meta}))
        with pytest.raises(AnnotationError, match=rf"^{root / 'via.json'}: path '{filename}' leads outside"):
            read_via(root)
        cases = read_cases("via", root, allow_outside_root="yes")
        assert [Path(c.image_path).resolve() for c in cases] == [(root / "ok.png").resolve(), outside.resolve()]
    with pytest.raises(ConfigError, match="allow_outside_root"):
        read_via(root, allow_outside_root="2")


@pytest.mark.parametrize("adapter", ["mias", "busi", "folder"])
def test_every_adapter_accepts_allow_outside_root(tmp_path, adapter):
    """`prepare --allow-outside-root` sets the option whatever the adapter: those whose annotations
    name no paths accept it (and check its value) rather than calling it an unknown option."""
    with pytest.raises(ConfigError, match="allow_outside_root"):
        read_cases(adapter, tmp_path, allow_outside_root="maybe")
    with pytest.raises(InputError):  # past the option check: the empty folder is the error
        read_cases(adapter, tmp_path, allow_outside_root="true")
