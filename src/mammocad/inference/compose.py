"""The composed prediction: a pipeline bundle (``models.pipeline``) run on whole images.

lesion bundle (``Predictor.predict_stages``: preprocess, the task's inference, lesions, Geometry
inverse) -> each lesion's patch cut from the PREPARED image around its prepared-grid box, as the
classifier was trained (``tasks.classify.classify_patches``) -> P(benign), P(malignant) per lesion
-> the image's P(normal), P(benign), P(malignant) -> the calls at the card's thresholds. A
classifier prepared with another spec than the lesion model gets the image prepared with its own
spec and each lesion's original-grid box mapped onto that grid. The candidates (what evaluation's
FROC curve is drawn from) are the lesion model's, unclassified.

Aggregation ``max``, over the image's lesions (the lesion model's operating point), with s_i the
lesion score and m_i = P(malignant | lesion i); an image without lesions has every max = 0::

    P(malignant) = max_i s_i * m_i
    P(abnormal)  = max_i s_i
    P(benign)    = P(abnormal) - P(malignant)      (>= 0, since s_i * m_i <= s_i)
    P(normal)    = 1 - P(abnormal)

The max, not a noisy-OR: one finding decides an image's label, as the datasets define it
(``records.label_from_lesions``), and the max does not grow with duplicate findings of one lesion
(overlapping detections) as a noisy-OR, which assumes independent findings, does. With an image
classifier (q: its normal / benign / malignant probabilities) the label probabilities are the mean
of the above and q: two estimates of one distribution, neither trusted alone.

Calls (``models.pipeline.DecisionThresholds``): a lesion is malignant when m_i >= ``lesion_malignant``,
else benign; an image is malignant when P(malignant) >= ``image_malignant``, else benign when
P(benign) + P(malignant) >= ``image_abnormal``, else normal.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from mammocad.inference.predictor import ImagePrediction, Predictor, StagedPrediction
from mammocad.io.images import LoadedImage
from mammocad.models.card import ModelCard
from mammocad.models.pipeline import DecisionThresholds, Stage
from mammocad.tasks.classify import PatchSettings
from mammocad.tasks.segment_lesions import DEFAULT_CANDIDATE_THRESHOLD, DEFAULT_MAX_CANDIDATES

IMAGE_CLASSES = ("normal", "benign", "malignant")  # datasets.targets.CLASSIFY_CLASSES["image"]
MALIGNANT = "malignant"


# ---- the rule ------------------------------------------------------------------------------------
def label_probabilities(scores: Sequence[float], malignant: Sequence[float],
                        image: Sequence[float] | None = None) -> dict[str, float]:
    """The image's normal / benign / malignant probabilities from its lesions' scores and
    P(malignant | lesion), averaged with an image classifier's (``image``) when there is one."""
    s = np.asarray(scores, np.float64)
    m = np.asarray(malignant, np.float64)
    p_abnormal = float(s.max()) if s.size else 0.0
    p_malignant = float((s * m).max()) if s.size else 0.0
    probs = np.array([1.0 - p_abnormal, p_abnormal - p_malignant, p_malignant])
    if image is not None:
        probs = (probs + np.asarray(image, np.float64)) / 2.0
    return {name: float(p) for name, p in zip(IMAGE_CLASSES, probs)}


def lesion_call(p_malignant: float, thresholds: DecisionThresholds) -> str:
    return MALIGNANT if p_malignant >= thresholds.lesion_malignant else "benign"


def image_call(probs: dict[str, float], thresholds: DecisionThresholds) -> str:
    if probs[MALIGNANT] >= thresholds.image_malignant:
        return MALIGNANT
    return "benign" if probs["benign"] + probs[MALIGNANT] >= thresholds.image_abnormal else "normal"


# ---- the stages ------------------------------------------------------------------------------------
@dataclass
class StageClassifier:
    """A classifier stage's model in eval mode, with how its inputs are made."""

    model: nn.Module
    card: ModelCard
    settings: PatchSettings
    autocast: str
    device: torch.device

    @classmethod
    def load(cls, stage: Stage, device: torch.device, autocast: str) -> "StageClassifier":
        from mammocad.models.bundle import load_bundle
        from mammocad.tasks.classify import output_names

        model, card = load_bundle(stage.folder, device=device, card=stage.card)
        settings = PatchSettings.from_card(card)
        output_names(model, settings)
        # "auto" follows the card, as Predictor does: a classifier validated in fp32 stays fp32
        return cls(model.eval(), card, settings, card.tiling.autocast if autocast == "auto" else autocast, device)


class PipelinePredictor:
    """A pipeline bundle ready to predict images: ``Predictor``'s ``predict_image`` interface (and
    ``name``, ``version``, ``voi``, ``modality``), each lesion classified and the image labelled."""

    def __init__(self, bundle: str | Path, device: str | torch.device | None = "auto", batch_size: int | None = None,
                 autocast: str = "auto", voi: int | str | None = 0, num_threads: int | None = None):
        from mammocad.models.pipeline import read_pipeline

        self.pipeline = read_pipeline(bundle)  # stages checked before any weights are read
        self.card = self.pipeline.card
        self.thresholds = self.card.pipeline.thresholds
        self.lesion_predictor = Predictor(self.pipeline.lesions.folder, device=device, batch_size=batch_size,
                                          autocast=autocast, voi=voi, num_threads=num_threads)
        self.device = self.lesion_predictor.device
        self.classifier = StageClassifier.load(self.pipeline.classifier, self.device, autocast)
        image_stage = self.pipeline.image_classifier
        self.image_classifier = None if image_stage is None else StageClassifier.load(image_stage, self.device, autocast)

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def version(self) -> str:
        return self.card.version

    @property
    def voi(self) -> int | str | None:
        return self.lesion_predictor.voi

    @property
    def modality(self) -> str:
        return self.lesion_predictor.modality

    def predict_image(self, image: str | Path | LoadedImage, laterality: str | None = None, *,
                      candidate_threshold: float | None = DEFAULT_CANDIDATE_THRESHOLD,
                      max_candidates: int | None = DEFAULT_MAX_CANDIDATES) -> ImagePrediction:
        """``Predictor.predict_image`` of the lesion stage, each lesion with its
        ``pathology_probabilities`` and ``pathology`` call, the prediction with the image's
        ``label_probabilities``, ``label`` and ``decision_thresholds`` (see the module docstring)."""
        staged = self.lesion_predictor.predict_stages(image, laterality, candidate_threshold=candidate_threshold,
                                                      max_candidates=max_candidates)
        prediction = staged.result.prediction
        prepared = PreparedGrids(staged, self.lesion_predictor.settings.spec, laterality)
        names = self.classifier.settings.class_names
        probs = self.lesion_probabilities(staged, prepared)
        for lesion, row in zip(prediction.lesions, probs):
            lesion.pathology_probabilities = {n: float(p) for n, p in zip(names, row)}
            lesion.pathology = lesion_call(lesion.pathology_probabilities[MALIGNANT], self.thresholds)
        image_probs = None
        if self.image_classifier is not None:
            from mammocad.tasks.classify import classify_image

            clf = self.image_classifier
            image_probs = classify_image(clf.model, prepared.for_spec(clf.card.preprocessing).pixels, clf.settings,
                                         autocast=clf.autocast, device=clf.device)
        prediction.label_probabilities = label_probabilities([les.score for les in prediction.lesions],
                                                             [les.pathology_probabilities[MALIGNANT]
                                                              for les in prediction.lesions], image_probs)
        prediction.label = image_call(prediction.label_probabilities, self.thresholds)
        prediction.decision_thresholds = self.thresholds.model_dump()
        prediction.model_name, prediction.model_version = self.name, self.version
        prediction.attributes["pipeline"] = self.describe()
        return staged.result

    def lesion_probabilities(self, staged: StagedPrediction, prepared: "PreparedGrids") -> np.ndarray:
        """(N, 2) P(benign), P(malignant) of the prediction's lesions, from patches of the prepared
        image the classifier was trained on: the lesion model's prepared-grid boxes when both share
        a preprocessing spec, else the original-grid boxes mapped onto the classifier's grid."""
        from mammocad.tasks.classify import classify_patches

        clf = self.classifier
        spec = clf.card.preprocessing
        grid = prepared.for_spec(spec)
        if spec == self.lesion_predictor.settings.spec:
            boxes = [staged.components[k].box for k in staged.kept]
        else:
            boxes = mapped_boxes([les.box for les in staged.result.prediction.lesions], grid)
        return classify_patches(clf.model, grid.pixels, boxes, clf.settings, autocast=clf.autocast, device=clf.device)

    def describe(self) -> dict[str, Any]:
        """What ``attributes["pipeline"]`` records: each stage's bundle and the rule."""
        stages = {s.role: {"name": s.card.name, "version": s.card.version, "weights_sha256": s.card.weights_sha256}
                  for s in self.pipeline.stages}
        return {**stages, "aggregation": self.card.pipeline.aggregation}


class PreparedGrids:
    """The image prepared with each spec a stage needs, each made once (the lesion model's is there
    already): ``preprocess_image`` results, as the lesion stage's laterality argument says."""

    def __init__(self, staged: StagedPrediction, spec: Any, laterality: str | None):
        self.image = staged.image
        self.laterality = laterality or staged.image.meta.get("laterality")
        self.by_spec = [(spec, staged.prepared)]

    def for_spec(self, spec: Any) -> Any:
        from mammocad.preprocess.pipeline import preprocess_image

        for known, result in self.by_spec:
            if known == spec:
                return result
        result = preprocess_image(self.image, spec, laterality=self.laterality)
        self.by_spec.append((spec, result))
        return result


def mapped_boxes(boxes: Sequence[Sequence[float]], grid: Any) -> list[tuple[float, float, float, float]]:
    """Original-grid boxes on a prepared grid (``grid.geometry``), clipped to it and at least one
    pixel wide and high (a lesion mostly outside another spec's crop still gets its patch)."""
    if not boxes:
        return []
    h, w = grid.pixels.shape
    out = []
    for x0, y0, x1, y1 in grid.geometry.forward_boxes(boxes):
        x0, x1 = sorted((float(np.clip(x0, 0, w - 1)), float(np.clip(x1, 1, w))))
        y0, y1 = sorted((float(np.clip(y0, 0, h - 1)), float(np.clip(y1, 1, h))))
        out.append((x0, y0, max(x1, x0 + 1.0), max(y1, y0 + 1.0)))
    return out


def open_predictor(bundle: str | Path, **kwargs: Any) -> Predictor | PipelinePredictor:
    """The predictor a bundle needs: ``PipelinePredictor`` for a pipeline bundle, else ``Predictor``."""
    from mammocad.models.pipeline import is_pipeline

    return PipelinePredictor(bundle, **kwargs) if is_pipeline(bundle) else Predictor(bundle, **kwargs)
