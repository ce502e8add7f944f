"""The classification task: patches from prepared lesion boxes (numbers, edge padding, lesion-free
background), class balance, the auxiliary loss, its config section, and one engine run that writes
a classifier bundle (a tiny prepared set of bright benign and dark-rimmed malignant discs)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from mammocad.errors import ConfigError, InputError
from mammocad.sampling import item_seed
from mammocad.tasks.classify import (PatchSettings, balanced_plan, check_input_size, class_names, classification_loss,
                                     classify_image, classify_patches, draw_background_window,
                                     inverse_frequency_weights, lesion_patch, lesion_window, load_split)
from mammocad.training.config import load_config, parse_config

TRAIN_IDS = [f"img{i}" for i in range(8)] + ["img10", "img11"]
VAL_IDS = ["img8", "img9"]  # benign, malignant
UNKNOWN_ID = "img10"  # its lesion has no pathology
NORMAL_ID = "img11"

CLASSIFIER = {"name": "classifier", "kwargs": {"backbone": "efficientnet_lite0", "pretrained": False, "dropout": 0.0}}
CLASSIFY_SECTIONS = {
    "task": "classify", "model": CLASSIFIER,
    "classify": {"target": "pathology", "context": 2.0, "min_side": 16, "input_size": 32, "balance": "sampler"},
    "sampling": {"batch_size": 4, "workers": 0},
    "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "schedule": {"kind": "none"}},
    "bundle": {"name": "tiny-cls", "description": "test classifier"},
}


def settings(**kw) -> PatchSettings:
    base = {"target": "pathology", "class_names": class_names("pathology"), "context": 1.0, "min_side": 8, "input_size": 8}
    return PatchSettings(**{**base, **kw})


def make_classify_prepared(root: Path) -> Path:
    """Twelve 96x80 "mammograms" through ``prepare_dataset("folder")`` at long side 64: one disc
    each, bright (benign) or dark-rimmed (malignant) alternating; img10's lesion has no pathology,
    img11 is normal (an empty mask)."""
    from mammocad.datasets.prepared import prepare_dataset
    from mammocad.preprocess.pipeline import PreprocessSpec

    raw = root / "raw"
    (raw / "images").mkdir(parents=True)
    (raw / "masks").mkdir()
    rng = np.random.default_rng(1)
    h, w = 96, 80
    yy, xx = np.mgrid[:h, :w]
    breast = (xx / 70.0) ** 2 + ((yy - 48) / 44.0) ** 2 < 1
    rows = []
    for i in range(12):
        img = np.zeros((h, w), np.float32)
        img[breast] = 0.35 + 0.03 * rng.standard_normal(int(breast.sum()))
        cy, cx, r = rng.integers(30, 66), rng.integers(14, 40), rng.integers(7, 10)
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        lesion = (d2 < r * r) & (i != 11)
        malignant = i % 2 == 1
        img[lesion] = 0.8
        if malignant:
            img[lesion & (d2 >= (r - 3) ** 2)] = 0.1  # the dark rim
        cv2.imwrite(str(raw / "images" / f"img{i}.png"), (np.clip(img, 0, 1) * 65535).astype(np.uint16))
        cv2.imwrite(str(raw / "masks" / f"img{i}_mask.png"), lesion.astype(np.uint8) * 255)
        if i not in (10, 11):
            rows.append({"image": f"img{i}.png", "pathology": "malignant" if malignant else "benign"})
    with open(raw / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "pathology"])
        writer.writeheader()
        writer.writerows(rows)
    prepared = root / "prepared"
    report = prepare_dataset("folder", raw, prepared, spec=PreprocessSpec(long_side=64), workers=1, progress=False)
    assert report.n_done == 12, report.failures
    splits = {"version": 1, "seed": 0, "method": "manual", "folds": [{"train": TRAIN_IDS, "val": VAL_IDS, "test": []}]}
    (prepared / "splits.json").write_text(json.dumps(splits, indent=1) + "\n")
    return prepared


@pytest.fixture(scope="module")
def prepared_root(tmp_path_factory) -> Path:
    return make_classify_prepared(tmp_path_factory.mktemp("classify"))


def set_kinds(prepared: Path, kinds: dict[str, str]) -> None:
    """Give the lesion of each named case another ``kind`` (the folder adapter records none)."""
    path = prepared / "cases.jsonl"
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for e in entries:
        if e["case"]["case_id"] in kinds:
            e["case"]["lesions"][0]["kind"] = kinds[e["case"]["case_id"]]
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))


# ---- patches ---------------------------------------------------------------------------------------
def test_the_patch_is_the_box_grown_by_the_context_made_square_and_padded_at_the_edge():
    assert lesion_window((10, 20, 30, 30), 1.0, 8) == (15, 10, 20)  # 20 x 10 box: side 20 around its centre (20, 25)
    assert lesion_window((10, 20, 30, 30), 2.0, 8) == (5, 0, 40)  # large context: twice the long side
    assert lesion_window((5, 5, 7, 6), 1.0, 8) == (2, 2, 8)  # a 2 x 1 calcification box: min_side 8
    pixels = np.arange(40 * 50, dtype=np.float32).reshape(40, 50) / 2000.0
    patch = lesion_patch(pixels, (10, 20, 18, 28), settings())  # side 8 = input_size: no resize
    np.testing.assert_array_equal(patch, pixels[20:28, 10:18])
    corner = lesion_patch(pixels, (0, 0, 4, 4), settings(context=2.0))  # top -2, left -2: 2 rows and columns of 0
    assert lesion_window((0, 0, 4, 4), 2.0, 8) == (-2, -2, 8)
    np.testing.assert_array_equal(corner[:2], 0)
    np.testing.assert_array_equal(corner[:, :2], 0)
    np.testing.assert_array_equal(corner[2:, 2:], pixels[0:6, 0:6])
    far = lesion_patch(pixels, (44, 36, 50, 40), settings())  # bottom-right edge: padded there
    assert lesion_window((44, 36, 50, 40), 1.0, 8) == (34, 43, 8)
    np.testing.assert_array_equal(far[:6, :7], pixels[34:40, 43:50])
    np.testing.assert_array_equal(far[6:], 0)
    np.testing.assert_array_equal(far[:, 7:], 0)
    assert lesion_patch(pixels, (0, 0, 40, 40), settings()).shape == (8, 8)  # shrunk to input_size
    with pytest.raises(InputError, match="x1 > x0"):
        lesion_window((5, 5, 5, 9), 1.0, 8)


def test_background_windows_hold_no_lesion_pixel_and_are_centred_in_the_breast():
    lesion = np.zeros((40, 50), bool)
    lesion[10:20, 15:30] = True
    breast = np.zeros((40, 50), bool)
    breast[:, :35] = True
    rng = np.random.default_rng(0)
    for side in (4, 8, 12, 30):
        top, left, s = draw_background_window(lesion, breast, side, 4, rng)
        assert not lesion[top:top + s, left:left + s].any()
        assert breast[top + s // 2, left + s // 2] and top + s <= 40 and left + s <= 50
    assert draw_background_window(lesion, breast, 30, 16, rng)[2] == 16  # 30 fits nowhere: min_side
    assert draw_background_window(lesion, breast, 30, 32, rng)[2] == 16  # nor 32: its half
    assert draw_background_window(np.ones((40, 50), bool), breast, 8, 4, rng) is None


def test_kind_pathology_backgrounds_contain_no_lesion_and_kinds_map_to_five_classes(prepared_root, tmp_path):
    import shutil

    from mammocad.datasets.prepared import PreparedDataset
    from mammocad.tasks.classify import ClassifyDataset

    root = tmp_path / "prepared"
    shutil.copytree(prepared_root, root)
    set_kinds(root, {"img0": "calcification", "img1": "calcification", "img2": "distortion", "img3": "asymmetry"})
    section = parse_config({"task": "classify", "data": {"prepared": "p"}, "model": CLASSIFIER,
                            "classify": {"target": "kind_pathology", "background_per_image": 2,
                                                         "min_side": 16}}, "k.yaml").classify
    prepared = PreparedDataset(root)
    split = load_split(prepared, TRAIN_IDS, section)
    names = class_names("kind_pathology")
    by_case = {it.case_id: names[it.label] for it in split.items if not it.background}
    assert by_case == {"img0": "calcification-benign", "img1": "calcification-malignant", "img2": "mass-benign",
                       "img3": "mass-malignant", "img4": "mass-benign", "img5": "mass-malignant", "img6": "mass-benign",
                       "img7": "mass-malignant"}  # distortion, asymmetry and other count as masses; img10 unknown: out
    assert sum(it.background for it in split.items) == 2 * len(TRAIN_IDS)  # the normal and the unknown image too
    # every background input, drawn as training draws it, holds no lesion pixel: its pixels equal the
    # image at a lesion-free window (reproduced from the same seed)
    dataset = ClassifyDataset(split, PatchSettings.from_section(section), balanced=False, seed=3)
    for index, item in enumerate(split.items):
        if not item.background:
            continue
        lesion, breast = split.tissue[item.case_id]
        rng = np.random.default_rng(item_seed(3, 0, 5, index))
        top, left, side = draw_background_window(lesion, breast, int(dataset.sides[rng.integers(len(dataset.sides))]),
                                                 section.min_side, rng)
        assert not lesion[top:top + side, left:left + side].any()
        image, label = dataset[index]
        assert names[int(label)] == "background" and image.shape == (1, 128, 128)


def test_unknown_pathology_lesions_are_left_out_of_pathology_training(prepared_root):
    from mammocad.datasets.prepared import PreparedDataset

    section = parse_config({"task": "classify", "data": {"prepared": "p"}, "model": CLASSIFIER}, "p.yaml").classify
    split = load_split(PreparedDataset(prepared_root), TRAIN_IDS, section)
    cases = sorted(it.case_id for it in split.items)
    assert cases == [f"img{i}" for i in range(8)] and UNKNOWN_ID not in cases and NORMAL_ID not in cases
    assert [class_names("pathology")[it.label] for it in split.items] == ["benign", "malignant"] * 4
    assert split.left_out == {"lesion(s) of unknown pathology": 1}
    assert split.notes("train") == ["train split: left out 1 lesion(s) of unknown pathology"]
    masses = section.model_copy(update={"kinds": ["mass"]})  # every folder lesion is of kind "other"
    assert load_split(PreparedDataset(prepared_root), TRAIN_IDS, masses).items == []


# ---- balance and loss ------------------------------------------------------------------------------
def test_the_class_balanced_sampler_draws_the_minority_class_half_the_time():
    labels = np.array([1] * 10 + [0] * 90)
    drawn = np.concatenate([labels[balanced_plan(labels, seed=0, epoch=e)] for e in range(20)])
    assert len(drawn) == 2000 and abs(drawn.mean() - 0.5) < 0.04  # unbalanced: 0.1
    np.testing.assert_array_equal(balanced_plan(labels, 0, 3), balanced_plan(labels, 0, 3))  # a resumed epoch
    assert not np.array_equal(balanced_plan(labels, 0, 3), balanced_plan(labels, 0, 4))
    np.testing.assert_allclose(inverse_frequency_weights(np.array([90, 10, 0])), [100 / 180, 100 / 20, 0.0])


def test_inceptions_auxiliary_loss_is_added_in_training(one_torch_thread):
    from mammocad.models import create_model

    torch.manual_seed(0)
    model = create_model("inception_v3", num_classes=2).train()
    with pytest.raises(ConfigError, match=r"^c\.yaml: classify\.input_size: 128 is too small for the auxiliary head "
                                          r"of inception_v3 in training; set it to 299$"):
        check_input_size(model, 128, "c.yaml")
    check_input_size(model, 299, "c.yaml")
    with torch.no_grad():
        outputs = model(torch.rand(2, 1, 299, 299))  # the auxiliary head needs the design size
    assert isinstance(outputs, tuple)
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        with_aux = classification_loss(outputs, labels, aux_weight=model.aux_weight)
        without = classification_loss(outputs[0], labels)
    assert model.aux_weight == pytest.approx(0.4)
    assert float(with_aux["loss"]) == pytest.approx(float(without["loss"] + 0.4 * with_aux["aux"]), rel=1e-6)
    assert float(with_aux["loss"]) != pytest.approx(float(without["loss"]))
    weights = torch.tensor([1.0, 3.0])  # balance: loss weighs the classes
    assert float(classification_loss(outputs[0], labels, weights)["loss"]) != pytest.approx(float(without["loss"]))


# ---- config ----------------------------------------------------------------------------------------
def test_a_bad_classify_value_is_one_line_naming_the_key_and_segment_configs_are_unaffected():
    base = {"task": "classify", "data": {"prepared": "p"}, "model": CLASSIFIER}
    with pytest.raises(ConfigError, match=r"^c\.yaml: classify\.target: Input should be 'pathology', "
                                          r"'kind_pathology' or 'image' \(got 'lesion'\)$"):
        parse_config({**base, "classify": {"target": "lesion"}}, "c.yaml")
    with pytest.raises(ConfigError, match=r"^c\.yaml: classify\.contxt: unknown key$"):
        parse_config({**base, "classify": {"contxt": 2}}, "c.yaml")
    with pytest.raises(ConfigError, match=r"^c\.yaml: classify\.context: Input should be greater than or equal to 1"):
        parse_config({**base, "classify": {"context": 0.5}}, "c.yaml")
    with pytest.raises(ConfigError, match=r"^c\.yaml: sampling\.patch: not used by task classify"):
        parse_config({**base, "sampling": {"patch": 64}}, "c.yaml")
    with pytest.raises(ConfigError, match=r"^c\.yaml: loss: not used by task classify"):
        parse_config({**base, "loss": {"name": "bce"}}, "c.yaml")
    with pytest.raises(ConfigError, match=r"^c\.yaml: classify\.kinds: selects lesions"):
        parse_config({**base, "classify": {"target": "image", "kinds": ["mass"]}}, "c.yaml")
    cfg = parse_config(base, "c.yaml")
    assert cfg.classify.target == "pathology" and cfg.classify.input_size == 128 and cfg.class_names == ["benign", "malignant"]
    segment = parse_config({"data": {"prepared": "p"}, "model": {"name": "unet"}}, "s.yaml")
    assert segment.classify is None and "classify" not in segment.to_json()  # resume keys of old runs unchanged
    with pytest.raises(ConfigError, match=r"^s\.yaml: classify: only for task: classify"):
        parse_config({"data": {"prepared": "p"}, "model": {"name": "unet"}, "classify": {}}, "s.yaml")


def test_a_classifier_card_says_how_its_patches_are_made():
    from mammocad.models.card import validate_card
    from mammocad.preprocess.pipeline import PreprocessSpec

    card = {"name": "c", "task": "classify", "architecture": {"name": "classifier"},
            "preprocessing": PreprocessSpec(long_side=64).model_dump(mode="json"), "class_names": ["benign", "malignant"]}
    with pytest.raises(ConfigError, match=r"^c: model card has no 'classify' section"):
        PatchSettings.from_card(validate_card(card, "m.json"))  # the card itself is valid: Predictor refuses it by task
    settings = PatchSettings.from_card(validate_card({**card, "classify": {"target": "pathology"}}, "m.json"))
    assert settings.input_size == 128 and settings.class_names == ("benign", "malignant")
    with pytest.raises(InputError, match=r"^m\.json: classify: class_names \['benign', 'malignant'\] are not those"):
        validate_card({**card, "classify": {"target": "image"}}, "m.json")
    seg = {**card, "task": "segment", "class_names": ["background", "lesion"]}
    assert "classify" not in validate_card(seg, "m.json").to_json()
    with pytest.raises(InputError, match=r"^m\.json: classify: only a classify model's card has this section"):
        validate_card({**seg, "classify": {"target": "pathology"}}, "m.json")


# ---- inference API and one engine run --------------------------------------------------------------
def test_patch_and_image_inference_give_probabilities(one_torch_thread):
    from mammocad.models import create_model

    torch.manual_seed(0)
    model = create_model("classifier", backbone="efficientnet_lite0", pretrained=False, num_classes=3).eval()
    pixels = np.random.default_rng(0).random((60, 50)).astype(np.float32)
    image = settings(target="image", class_names=class_names("image"), input_size=32)
    probs = classify_image(model, pixels, image)
    assert probs.shape == (3,) and probs.sum() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ConfigError, match="classify_image"):
        classify_patches(model, pixels, [(1, 1, 9, 9)], image)
    patches = classify_patches(model, pixels, [(1, 1, 9, 9), (20, 30, 40, 44)], settings(input_size=32))
    assert patches.shape == (2, 3) and np.allclose(patches.sum(1), 1.0, atol=1e-5)
    with pytest.raises(ConfigError, match="eval mode"):
        classify_patches(model.train(), pixels, [(1, 1, 9, 9)], settings(input_size=32))


def test_the_engine_trains_a_classifier_in_stages_and_writes_a_classify_bundle(prepared_root, tmp_path, one_torch_thread):
    import shutil

    from mammocad.datasets.prepared import PreparedDataset
    from mammocad.models.bundle import load_bundle
    from mammocad.training.engine import train

    shutil.copytree(prepared_root, tmp_path / "prepared")
    stages = [{"name": "head", "epochs": 1, "freeze": ["encoder"]},
              {"name": "top", "epochs": 1, "freeze": ["encoder.stages.0", "encoder.stages.1", "encoder.stages.2"]}]
    # tiny_prepared's base config is a segmentation one (loss, patch, inference): a classifier refuses those keys
    config = {**CLASSIFY_SECTIONS, "data": {"prepared": "prepared", "fold": 0},
              "augment": {"hflip_p": 0.5, "affine_p": 0.5, "degrees": 20, "brightness_p": 0, "contrast_p": 0,
                          "blur_p": 0, "sharpen_p": 0, "noise_p": 0},
              "train": {"epochs": 2, "patience": 5, "amp": "none", "threads": 1, "seed": 3, "final_n_boot": 20,
                        "tensorboard": False, "stages": stages}}
    (tmp_path / "cls.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cfg = load_config(tmp_path / "cls.yaml")
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.bundle_dir is not None and result.epochs == 2
    assert [r["stage"] for r in result.history] == ["head", "top"]
    assert all(r["val_auc"] is not None and 0.0 <= r["val_auc"] <= 1.0 for r in result.history)
    card = json.loads((Path(result.bundle_dir) / "model.json").read_text())
    assert card["task"] == "classify" and card["class_names"] == ["benign", "malignant"] and card["output"] == "softmax"
    assert card["classify"] == {"target": "pathology", "context": 2.0, "min_side": 16, "input_size": 32, "kinds": None}
    assert card["config"]["classify"]["balance"] == "sampler"
    val = card["validation"]
    assert val["n_images"] == 2 and "roc_auc" in val["headline"] and val["positive_class"] == "malignant"
    assert "train split: left out 1 lesion(s) of unknown pathology" in val["notes"]
    assert (tmp_path / "run" / "validation" / "metrics.json").is_file()
    model, loaded = load_bundle(result.bundle_dir)
    prepared = PreparedDataset(tmp_path / "prepared")
    pc = prepared.by_id("img9")
    probs = classify_patches(model.eval(), prepared.load_image(pc), pc.boxes, PatchSettings.from_card(loaded))
    assert probs.shape == (1, 2) and probs.sum() == pytest.approx(1.0, abs=1e-5)
    # `mammocad evaluate` scores a classifier bundle as its validation did: same items, same numbers
    from mammocad.evaluation.run import evaluate_prepared

    out = tmp_path / "eval"
    report = evaluate_prepared(result.bundle_dir, tmp_path / "prepared", split="val", out_dir=out, n_boot=20)
    assert report.n_images == val["n_images"]
    assert report.headline["roc_auc"].value == pytest.approx(val["headline"]["roc_auc"]["value"])
    assert all((out / name).is_file() for name in ("metrics.json", "metrics.md", "roc.png", "reliability.png"))
    every = evaluate_prepared(result.bundle_dir, tmp_path / "prepared", split="all", n_boot=0)
    assert every.n_images == 10  # 12 images: one normal, one lesion of unknown pathology left out
    assert any("left out 1 lesion(s) of unknown pathology" in n for n in every.notes)
    from typer.testing import CliRunner

    from mammocad.cli import app

    res = CliRunner().invoke(app, ["evaluate", str(tmp_path / "prepared"), "--model", str(result.bundle_dir),
                                   "--split", "all", "--n-boot", "0", "--out", str(tmp_path / "eval_cli")])
    assert res.exit_code == 0, res.output
    assert "classification: 10 items" in res.output and "roc_auc" in res.output
