import json

import numpy as np
import pytest

from mammocad.errors import InputError, MammocadError
from mammocad.records import Case, Lesion, Prediction, PredictedLesion, label_from_lesions, read_jsonl, write_jsonl


def _case() -> Case:
    return Case(
        case_id="P_00001_LEFT_CC", patient_id="P_00001", dataset="cbis-ddsm", modality="MG",
        image_path="/x/1-1.dcm", laterality="L", view="CC", label="malignant", split="train",
        lesions=[
            Lesion(pathology="malignant", kind="mass", source_label="MALIGNANT", mask_path="/x/roi.dcm",
                   attributes={"assessment": 5}),
            Lesion(pathology="benign", kind="calcification", polygon=[(1, 2), (3, 4), (5, 1)]),
            Lesion(pathology="benign", kind="mass", circle=(10.5, 20.5, 7)),
            Lesion(pathology="unknown", kind="other", box=(0, 0, 4, 4)),
            Lesion(pathology="benign", kind="calcification", source_label="CALC B"),
        ],
        attributes={"density": 2},
    )


def test_case_json_round_trip():
    case = _case()
    text = json.dumps(case.to_dict())
    back = Case.from_dict(json.loads(text))
    assert back == case
    assert back.lesions[1].polygon == [(1.0, 2.0), (3.0, 4.0), (5.0, 1.0)]
    assert back.lesions[2].circle == (10.5, 20.5, 7.0)
    assert [les.has_geometry for les in back.lesions] == [True, True, True, True, False]


def test_prediction_json_round_trip(tmp_path):
    pred = Prediction(image_path="a.dcm", image_size=(40, 30), model_name="unet", model_version="1",
                      lesions=[PredictedLesion(box=(1, 2, 3, 4), score=0.9, label="malignant",
                                               class_probabilities={"benign": 0.1, "malignant": 0.9}, area=4.0)])
    write_jsonl(tmp_path / "p.jsonl", [pred, pred])
    rows = list(read_jsonl(tmp_path / "p.jsonl"))
    assert len(rows) == 2 and Prediction.from_dict(rows[0]) == pred


def test_invalid_values_rejected():
    with pytest.raises(ValueError):
        Lesion(pathology="maybe")
    with pytest.raises(ValueError):
        Case(case_id="a", patient_id="p", dataset="d", modality="CT", image_path="x")


def test_label_from_lesions():
    assert label_from_lesions([]) == "normal"
    assert label_from_lesions([Lesion(pathology="benign"), Lesion(pathology="malignant")]) == "malignant"
    assert label_from_lesions([Lesion(pathology="benign")] * 2) == "benign"
    assert label_from_lesions([Lesion(pathology="benign"), Lesion()]) == "unknown"


def test_error_is_one_line_naming_the_source():
    err = InputError("/data/x.dcm", "truncated\npixel data")
    assert str(err) == "/data/x.dcm: truncated pixel data"
    assert isinstance(err, MammocadError)


def test_cropped_mask_rle_is_coco_rle_of_the_full_mask():
    from pycocotools import mask as coco_mask

    from mammocad.records import CroppedMask

    rng = np.random.default_rng(0)
    for shape, window in (((40, 30), (5, 7, 20, 25)), ((13, 9), (0, 0, 13, 9)), ((8, 6), (7, 5, 8, 6))):
        full = np.zeros(shape, bool)
        y0, x0, y1, x1 = window
        full[y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) < 0.5
        full[y0, x0] = True
        cropped = CroppedMask.from_full(full)
        rle = cropped.to_rle()
        expected = coco_mask.encode(np.asfortranarray(full.astype(np.uint8)))
        assert rle == {"size": list(shape), "counts": expected["counts"].decode("ascii")}
        back = CroppedMask.from_rle(json.loads(json.dumps(rle)))
        assert np.array_equal(back.full(), full) and back.box == cropped.box and back.area == int(full.sum())


def test_predicted_lesion_mask_stays_in_memory_candidates_carry_rle():
    from mammocad.records import CroppedMask

    full = np.zeros((40, 30), bool)
    full[10:14, 3:9] = True
    lesion = PredictedLesion(box=(3, 10, 9, 14), score=0.7, area=24.0, mask=CroppedMask.from_full(full))
    assert "mask" not in lesion.to_dict() and "mask_rle" not in lesion.to_dict()
    pred = Prediction(image_path="a.png", image_size=(40, 30), model_name="m", model_version="1",
                      lesions=[lesion], candidates=[lesion])
    d = json.loads(json.dumps(pred.to_dict()))
    assert "mask_rle" not in d["lesions"][0] and "mask_rle" in d["candidates"][0]
    back = Prediction.from_dict(d)
    assert back == pred and back.lesions[0].mask is None
    assert np.array_equal(back.candidates[0].mask.full(), full)
