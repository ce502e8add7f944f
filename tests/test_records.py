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
