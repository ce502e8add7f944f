"""What a model's output means lives in its task module: ``Predictor`` reaches the prepared-grid
inference (probabilities, lesions, candidates) through ``self.task``, so a detection task brings its
own without changing ``Predictor``; and code moved there exists once."""

from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
import torch

from mammocad.inference.predictor import Predictor
from mammocad.models import create_model
from mammocad.preprocess.pipeline import PreprocessSpec


def tiny_predictor() -> Predictor:
    torch.manual_seed(0)
    model = create_model("unet", num_classes=1, base_channels=4, depth=2, norm="group").eval()
    card = {"name": "tiny", "version": "0.1", "task": "segment", "architecture": model.mammocad_config,
            "preprocessing": PreprocessSpec(modality="US", long_side=96).model_dump(mode="json"),
            "thresholds": {"probability": 0.5, "min_area": 4},
            "tiling": {"tile": 32, "overlap": 0.25, "mode": "sliding", "batch_size": 2}}
    return Predictor((model, card), device="cpu", autocast="fp32")


def test_the_predictor_runs_its_tasks_inference_on_the_prepared_grid(tmp_path):
    """Every prepared-grid step of ``predict_image`` is a call on the task module (before: lesions
    and candidates came from functions of ``inference.predictor`` itself)."""
    predictor = tiny_predictor()
    segment, calls = predictor.task, []

    def spy(name):
        def call(*args, **kwargs):
            calls.append(name)
            return getattr(segment, name)(*args, **kwargs)
        return call

    names = ("infer", "find_lesions", "find_candidates", "max_score", "output_names")
    predictor.task = SimpleNamespace(**{n: spy(n) for n in names})
    png = tmp_path / "us.png"
    cv2.imwrite(str(png), np.round(np.random.default_rng(0).random((96, 80)) * 255).astype(np.uint8))
    result = predictor.predict_image(png)
    assert calls == ["infer", "find_lesions", "find_candidates", "max_score"]
    assert "candidate_search" in result.prediction.attributes
    calls.clear()
    predictor.predict_image(png, candidate_threshold=None)  # no candidates asked: no search
    assert calls == ["infer", "find_lesions", "max_score"]


def test_removed_duplicates_stay_removed():
    """One implementation each: file hashing is io's (models.card had a second one), lesions from a
    probability map are the segment task's (evaluation had a max-scored copy), and ``Predictor``
    has no unused label-map method."""
    from mammocad.evaluation import lesion_detection
    from mammocad.inference import postprocess
    from mammocad.io.discover import file_sha256
    from mammocad.models import bundle, card
    from mammocad.training import card as training_card

    assert bundle.file_sha256 is file_sha256 and training_card.file_sha256 is file_sha256
    assert not hasattr(card, "file_sha256")
    assert not hasattr(lesion_detection, "components_from_probability")
    assert not hasattr(postprocess, "probability_to_lesions") and not hasattr(postprocess, "lesion_label_map")
    assert not hasattr(Predictor, "label_map")
