"""Pipeline bundles (``models.pipeline``, ``inference.compose``): a lesion bundle, a pathology
classifier on each lesion's prepared-grid patch, the image's label probabilities by the ``max``
rule, the calls at the card's thresholds, overlays coloured by the call; stages pinned by name,
version and weights hash, and refused in the wrong slot.

The stage bundles are made in seconds without training: the lesion model is a pixel logistic
regression set by hand to threshold the prepared intensity (the synthetic lesions are the brightest
tissue), the classifiers are seeded random EfficientNet-Lite0s on 32 px patches: what is tested is
the plumbing and the arithmetic, not what the classifier knows.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from mammocad.errors import ConfigError, InputError
from mammocad.preprocess.pipeline import PreprocessSpec
from mammocad.records import Prediction, PredictedLesion

SPEC = PreprocessSpec(long_side=64)
CLASSIFY = {"pathology": 2, "image": 3, "kind_pathology": 5}  # target -> classes
CLASS_NAMES = {"pathology": ["benign", "malignant"], "image": ["normal", "benign", "malignant"],
               "kind_pathology": ["background", "calcification-benign", "mass-benign", "calcification-malignant",
                                  "mass-malignant"]}


def save_threshold_segmenter(folder: Path, spec: PreprocessSpec = SPEC) -> Path:
    """A segment bundle whose lesion probability is sigmoid(40 (intensity - 0.75)) on the prepared grid."""
    from mammocad.models import create_model
    from mammocad.models.bundle import save_bundle

    model = create_model("logreg", in_channels=1, num_classes=1)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.weight[0, 0] = 40.0  # feature 0 is the intensity itself
        model.classifier.bias.fill_(-30.0)
    card = {"name": "tiny-threshold-seg", "version": "1.0", "task": "segment", "output": "sigmoid",
            "preprocessing": spec.model_dump(mode="json"), "class_names": ["background", "lesion"],
            "thresholds": {"probability": 0.5, "min_area": 4},
            "tiling": {"tile": 64, "overlap": 0.25, "mode": "sliding", "batch_size": 2, "autocast": "fp32"}}
    return save_bundle(folder, model, card)


def save_classifier(folder: Path, target: str, seed: int, spec: PreprocessSpec = SPEC) -> Path:
    from mammocad.models import create_model
    from mammocad.models.bundle import save_bundle

    torch.manual_seed(seed)
    model = create_model("classifier", backbone="efficientnet_lite0", pretrained=False, dropout=0.0,
                         num_classes=CLASSIFY[target]).eval()
    card = {"name": f"tiny-{target}-cls", "version": "1.0", "task": "classify", "output": "softmax",
            "preprocessing": spec.model_dump(mode="json"), "class_names": CLASS_NAMES[target],
            "classify": {"target": target, "context": 2.0, "min_side": 16, "input_size": 32},
            "tiling": {"autocast": "fp32"}}
    return save_bundle(folder, model, card)


def write_mammogram(path: Path) -> Path:
    """A 160 x 128 16-bit "mammogram": half-ellipse breast on black (chest wall left), two bright
    discs far apart (top and bottom), so each overlay label stays clear of the other lesion."""
    h, w = 160, 128
    yy, xx = np.mgrid[:h, :w]
    rng = np.random.default_rng(0)
    breast = (xx / 115.0) ** 2 + ((yy - 80) / 76.0) ** 2 < 1
    img = np.zeros((h, w), np.float32)
    img[breast] = 0.35 + 0.02 * rng.standard_normal(int(breast.sum()))
    for cy, cx, r in ((40, 40, 11), (125, 45, 13)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 0.8
    cv2.imwrite(str(path), (np.clip(img, 0, 1) * 65535).astype(np.uint16))
    return path


@pytest.fixture(scope="module")
def stages(tmp_path_factory, one_torch_thread) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipeline")
    out = {"root": root, "mammogram": write_mammogram(root / "mammo.png"),
           "lesions": save_threshold_segmenter(root / "stages" / "seg")}
    for seed, target in enumerate(CLASSIFY):
        out[target] = save_classifier(root / "stages" / target, target, seed)
    return out


def compose(stages: dict[str, Path], name: str, **kw) -> Path:
    from mammocad.models.pipeline import write_pipeline_bundle

    return write_pipeline_bundle(stages["root"] / name, name, stages["lesions"], stages["pathology"], **kw)


def predict(bundle: Path, image: Path, out: Path) -> dict:
    from mammocad.inference.predict_run import predict_files

    report = predict_files([image], out, model=bundle, device="cpu", autocast="fp32", progress=False)
    assert report.n_failed == 0, report.failures
    return json.loads((out / f"{image.stem}.json").read_text())


def max_rule(lesions: list[dict]) -> dict[str, float]:
    """The documented ``max`` aggregation, recomputed from the JSON's numbers."""
    scores = [les["score"] for les in lesions]
    malignant = [les["score"] * les["pathology_probabilities"]["malignant"] for les in lesions]
    p_abnormal, p_malignant = max(scores, default=0.0), max(malignant, default=0.0)
    return {"normal": 1.0 - p_abnormal, "benign": p_abnormal - p_malignant, "malignant": p_malignant}


def colour_of(bgr: np.ndarray) -> str | None:
    """Which overlay colour (``visualize.COLOURS``: benign, malignant, lesion) a pixel shows, drawn
    antialiased over grey (a mix a C + (1 - a) g keeps C's hue: its grey-free part points the same
    way); None for a grey pixel."""
    from mammocad.visualize import COLOURS

    px = np.asarray(bgr, np.float64)
    if px.max() - px.min() < 40:
        return None
    chroma = px - px.mean()
    best = {k: float(chroma @ (c - c.mean()) / np.linalg.norm(c - c.mean()))
            for k, c in ((k, np.asarray(COLOURS[k], np.float64)) for k in ("benign", "malignant", "lesion"))}
    return max(best, key=best.get)


# ---- the card ----------------------------------------------------------------------------------------
def test_a_pipeline_card_pins_its_stages_and_is_not_a_model(stages):
    from mammocad.models.bundle import load_bundle, read_card
    from mammocad.models.pipeline import is_pipeline, read_pipeline

    folder = compose(stages, "card-pipe", thresholds={"lesion_malignant": 0.4})
    card = json.loads((folder / "model.json").read_text())
    assert card["task"] == "pipeline" and not (folder / "model.safetensors").exists()
    ref = card["pipeline"]["classifier"]
    assert ref["bundle"] == "../stages/pathology"  # relative to the pipeline folder: the pair moves together
    assert ref["weights_sha256"] == read_card(stages["pathology"]).weights_sha256
    assert card["pipeline"]["thresholds"] == {"lesion_malignant": 0.4, "image_malignant": 0.5, "image_abnormal": 0.5}
    assert card["pipeline"]["aggregation"] == "max" and card["pipeline"]["image_classifier"] is None
    assert is_pipeline(folder) and not is_pipeline(stages["lesions"])
    assert read_pipeline(folder).classifier.card.name == "tiny-pathology-cls"
    assert read_card(stages["lesions"]).task == "segment"  # ordinary bundles read as before
    for reader in (read_card, load_bundle):
        with pytest.raises(InputError, match=r"model\.json: is a pipeline bundle .* not one model"):
            reader(folder)
    card["pipeline"]["thresholds"]["lesion_malignat"] = 0.3  # a typo is refused, not ignored
    (folder / "model.json").write_text(json.dumps(card))
    with pytest.raises(InputError, match=r"model\.json: pipeline\.thresholds\.lesion_malignat: unknown key$"):
        read_pipeline(folder)


def test_a_changed_stage_is_refused_in_one_line_naming_the_stage(stages, tmp_path, capsys):
    from mammocad.inference.compose import PipelinePredictor

    folder = compose(stages, "changed-pipe")
    card = json.loads((folder / "model.json").read_text())
    card["pipeline"]["classifier"]["weights_sha256"] = "0" * 64
    (folder / "model.json").write_text(json.dumps(card))
    with pytest.raises(InputError) as err:
        PipelinePredictor(folder, device="cpu")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{folder / 'model.json'}: pipeline.classifier: bundle ")
    assert "changed since the pipeline was composed (weights_sha256" in message
    from mammocad.cli import main

    with pytest.raises(SystemExit) as ex:
        main(["predict", str(stages["mammogram"]), "--out", str(tmp_path / "out"), "--model", str(folder), "--device", "cpu"])
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert ex.value.code == 1 and err_lines == [f"mammocad: {message}"]
    assert not (tmp_path / "out" / "mammo.json").exists()  # refused before any input


@pytest.mark.parametrize("target", ["image", "kind_pathology"])
def test_a_classifier_of_another_target_is_refused_in_the_classifier_slot(stages, target):
    from mammocad.models.pipeline import read_pipeline, write_pipeline_bundle

    root = stages["root"]
    with pytest.raises(ConfigError, match=rf"^{stages[target] / 'model.json'}: cannot be the pipeline's classifier "
                                          rf"stage: bundle tiny-{target}-cls classifies target '{target}'; "
                                          r"this stage needs target 'pathology'$"):
        write_pipeline_bundle(root / f"wrong-{target}", "wrong", stages["lesions"], stages[target])
    # a card edited by hand to point the slot at it (with its true hash) is refused when read
    from mammocad.models.bundle import read_card

    folder = compose(stages, f"edited-{target}")
    card = json.loads((folder / "model.json").read_text())
    wrong = read_card(stages[target])
    card["pipeline"]["classifier"] = {"bundle": f"../stages/{target}", "name": wrong.name, "version": wrong.version,
                                      "weights_sha256": wrong.weights_sha256}
    (folder / "model.json").write_text(json.dumps(card))
    with pytest.raises(InputError, match=rf"pipeline\.classifier: bundle tiny-{target}-cls classifies target"):
        read_pipeline(folder)
    with pytest.raises(ConfigError, match=r"model\.json: cannot be the pipeline's lesions stage: bundle "
                                          r"tiny-pathology-cls is a classify model, not a segment or detect model$"):
        write_pipeline_bundle(root / "wrong-lesions", "wrong", stages["pathology"], stages["pathology"])


# ---- the prediction ------------------------------------------------------------------------------------
def test_predict_writes_lesion_pathology_and_image_label_probabilities_by_the_max_rule(stages, tmp_path):
    from mammocad.inference.predictor import Predictor
    from mammocad.io.images import read_image
    from mammocad.models.bundle import load_bundle
    from mammocad.preprocess.pipeline import preprocess_image
    from mammocad.tasks.classify import PatchSettings, classify_patches

    folder = compose(stages, "pipe", version="2.1", thresholds={"lesion_malignant": 0.5, "image_malignant": 0.3,
                                                                "image_abnormal": 0.6})
    record = predict(folder, stages["mammogram"], tmp_path / "out")
    assert record["model_name"] == "pipe" and record["model_version"] == "2.1"
    lesions = record["lesions"]
    assert len(lesions) == 2  # both discs, nothing else
    for les in lesions:
        probs = les["pathology_probabilities"]
        assert set(probs) == {"benign", "malignant"} and sum(probs.values()) == pytest.approx(1.0, abs=1e-6)
        assert les["pathology"] == ("malignant" if probs["malignant"] >= 0.5 else "benign")
    # the patches are cut around the lesions' PREPARED-grid boxes, as the classifier was trained
    seg = Predictor(stages["lesions"], device="cpu", autocast="fp32")
    pre = preprocess_image(read_image(stages["mammogram"]), SPEC)
    boxes = [c.box for c in seg.lesions(seg.infer(pre.pixels, pre.breast_mask), pre.breast_mask)]
    model, card = load_bundle(stages["pathology"])
    expected = classify_patches(model, pre.pixels, boxes, PatchSettings.from_card(card))
    got = np.array([[les["pathology_probabilities"][n] for n in ("benign", "malignant")] for les in lesions])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    labels = record["label_probabilities"]
    assert list(labels) == ["normal", "benign", "malignant"] and sum(labels.values()) == pytest.approx(1.0, abs=1e-9)
    assert labels == pytest.approx(max_rule(lesions), abs=1e-12)
    assert record["decision_thresholds"] == {"lesion_malignant": 0.5, "image_malignant": 0.3, "image_abnormal": 0.6}
    call = ("malignant" if labels["malignant"] >= 0.3 else
            "benign" if labels["benign"] + labels["malignant"] >= 0.6 else "normal")
    assert record["label"] == call
    assert record["attributes"]["pipeline"]["classifier"]["name"] == "tiny-pathology-cls"
    assert record["candidates"] and all(not c["pathology_probabilities"] for c in record["candidates"])
    back = Prediction.from_dict(record)
    assert back.label_probabilities == labels and back.lesions[0].pathology == lesions[0]["pathology"]


def test_the_rule_and_the_calls_at_their_edges():
    from mammocad.inference.compose import image_call, label_probabilities, lesion_call
    from mammocad.models.pipeline import DecisionThresholds

    assert label_probabilities([], []) == {"normal": 1.0, "benign": 0.0, "malignant": 0.0}  # no lesion: normal
    # the most probable malignant finding, not the most probable lesion's malignancy
    probs = label_probabilities([0.9, 0.6], [0.1, 0.8])
    assert probs == pytest.approx({"normal": 0.1, "benign": 0.42, "malignant": 0.48})
    t = DecisionThresholds(lesion_malignant=0.8, image_malignant=0.48, image_abnormal=0.9)
    assert lesion_call(0.8, t) == "malignant" and lesion_call(0.7999, t) == "benign"
    assert image_call(probs, t) == "malignant"  # at the threshold
    assert image_call(probs, DecisionThresholds(image_malignant=0.5, image_abnormal=0.9)) == "benign"
    assert image_call(probs, DecisionThresholds(image_malignant=0.5, image_abnormal=0.95)) == "normal"
    assert label_probabilities([0.9], [0.5], image=[0.5, 0.3, 0.2]) == pytest.approx(
        {"normal": 0.3, "benign": 0.375, "malignant": 0.325})


def test_an_image_classifier_is_averaged_with_the_lesion_rule(stages, tmp_path):
    from mammocad.io.images import read_image
    from mammocad.models.bundle import load_bundle
    from mammocad.preprocess.pipeline import preprocess_image
    from mammocad.tasks.classify import PatchSettings, classify_image

    record = predict(compose(stages, "pipe-image", image_classifier=stages["image"]), stages["mammogram"], tmp_path / "out")
    model, card = load_bundle(stages["image"])
    q = classify_image(model, preprocess_image(read_image(stages["mammogram"]), SPEC).pixels, PatchSettings.from_card(card))
    rule = max_rule(record["lesions"])
    expected = {n: (rule[n] + float(p)) / 2 for n, p in zip(("normal", "benign", "malignant"), q)}
    assert record["label_probabilities"] == pytest.approx(expected, abs=1e-6)
    assert sum(record["label_probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
    assert record["attributes"]["pipeline"]["image_classifier"]["name"] == "tiny-image-cls"


def test_a_classifier_prepared_at_another_size_gets_the_lesions_boxes_on_its_own_grid(stages, tmp_path):
    from mammocad.io.images import read_image
    from mammocad.models.bundle import load_bundle
    from mammocad.preprocess.pipeline import preprocess_image
    from mammocad.tasks.classify import PatchSettings, classify_patches

    other = PreprocessSpec(long_side=96)
    clf = save_classifier(tmp_path / "cls96", "pathology", 7, spec=other)
    from mammocad.models.pipeline import write_pipeline_bundle

    folder = write_pipeline_bundle(tmp_path / "pipe96", "pipe96", stages["lesions"], clf)
    record = predict(folder, stages["mammogram"], tmp_path / "out")
    pre = preprocess_image(read_image(stages["mammogram"]), other)
    boxes = pre.geometry.forward_boxes([les["box"] for les in record["lesions"]])
    model, card = load_bundle(clf)
    expected = classify_patches(model, pre.pixels, boxes, PatchSettings.from_card(card))
    got = np.array([[les["pathology_probabilities"][n] for n in ("benign", "malignant")] for les in record["lesions"]])
    assert len(got) == 2
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_the_overlay_colours_each_lesion_by_its_pathology_call(stages, tmp_path):
    from typer.testing import CliRunner

    from mammocad.cli import app

    first = predict(compose(stages, "pipe-first"), stages["mammogram"], tmp_path / "first")
    p = sorted(les["pathology_probabilities"]["malignant"] for les in first["lesions"])
    assert p[0] < p[1], "the seeded classifier must tell the two lesions apart for this test"
    folder = compose(stages, "pipe-split", thresholds={"lesion_malignant": (p[0] + p[1]) / 2})
    out = tmp_path / "split"
    res = CliRunner().invoke(app, ["predict", str(stages["mammogram"]), "--out", str(out), "--model", str(folder),
                                   "--device", "cpu", "--autocast", "fp32"])
    assert res.exit_code == 0, res.output
    record = json.loads((out / "mammo.json").read_text())
    assert sorted(les["pathology"] for les in record["lesions"]) == ["benign", "malignant"]
    overlay = cv2.imread(str(out / record["overlay"]), cv2.IMREAD_COLOR)
    for les in record["lesions"]:
        mask = cv2.imread(str(out / les["mask"]), cv2.IMREAD_GRAYSCALE) > 0
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        xy = np.concatenate(contours)[:, 0]
        seen = [colour_of(overlay[y, x]) for x, y in xy]
        assert seen.count(les["pathology"]) >= len(xy) // 2 and set(seen) <= {les["pathology"], None}, seen


def test_a_plain_lesion_bundle_keeps_its_overlay_and_json(stages, tmp_path):
    out = tmp_path / "plain"
    record = predict(stages["lesions"], stages["mammogram"], out)
    assert record["model_name"] == "tiny-threshold-seg" and len(record["lesions"]) == 2
    assert all(les["pathology"] is None and les["pathology_probabilities"] == {} for les in record["lesions"])
    assert record["label_probabilities"] == {} and record["label"] is None and record["decision_thresholds"] == {}
    overlay = cv2.imread(str(out / record["overlay"]), cv2.IMREAD_COLOR)
    mask = cv2.imread(str(out / record["lesions"][0]["mask"]), cv2.IMREAD_GRAYSCALE) > 0
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    xy = np.concatenate(contours)[:, 0]
    seen = [colour_of(overlay[y, x]) for x, y in xy]
    assert seen.count("lesion") >= len(xy) // 2 and set(seen) <= {"lesion", None}, seen


def test_an_old_prediction_json_without_the_new_fields_still_loads():
    old = {"image_path": "a.png", "image_size": [40, 30], "model_name": "m", "model_version": "1",
           "image_probabilities": {},  # the field's old name, never filled
           "lesions": [{"box": [1, 2, 5, 6], "score": 0.9, "label": "lesion", "class_probabilities": {},
                        "area": 16.0, "mask_path": "a_lesion1.png"}],
           "attributes": {"task": "segment"}, "candidates": []}
    pred = Prediction.from_dict(old)
    assert pred.label_probabilities == {} and pred.label is None and pred.decision_thresholds == {}
    assert pred.lesions[0].pathology is None and pred.lesions[0].pathology_probabilities == {}
    lesion = PredictedLesion(box=(1, 2, 5, 6), score=0.9, pathology_probabilities={"benign": 0.3, "malignant": 0.7},
                             pathology="malignant")
    assert PredictedLesion.from_dict(json.loads(json.dumps(lesion.to_dict()))) == lesion
    with pytest.raises(ValueError, match="pathology"):
        PredictedLesion(box=(1, 2, 5, 6), score=0.9, pathology="cancer")

