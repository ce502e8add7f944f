"""One model bundle, loaded once, predicting lesions on whole images in their ORIGINAL pixel grid.

image (DICOM / PNG / PGM / JPEG, or a LoadedImage) -> ``preprocess_image`` with the bundle's spec
(MG: breast crop, canonical flip, resize; US: scan-area crop, resize) -> the task's inference on the
prepared grid (``task.infer``, then ``task.find_lesions``: threshold, min area, inside the
breast) -> ``lesions_to_original`` through the Geometry -> ``Prediction`` + masks of the original
image's size; plus the candidates (every component at a low threshold, ``task.find_candidates``) that
evaluation's FROC curve is drawn from. What the output means is the task module's (``mammocad.tasks``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from mammocad.devices import resolve_device
from mammocad.errors import ConfigError
from mammocad.io.images import LoadedImage, read_image
from mammocad.models.card import MAX_BATCH, ModelCard, validate_card
from mammocad.preprocess.pipeline import PreprocessSpec
from mammocad.records import CroppedMask, LesionComponent, Prediction
from mammocad.tasks import get_task
from mammocad.tasks.segment import InferenceSettings
from mammocad.tasks.segment_lesions import DEFAULT_CANDIDATE_THRESHOLD, DEFAULT_MAX_CANDIDATES


class ImagePrediction(NamedTuple):
    """``predict_image``'s result; unpacks as ``prediction, union_mask, lesion_masks``."""

    # boxes, scores, classes in original pixel coordinates; every lesion and candidate carries its
    # mask on the original grid (``PredictedLesion.mask``)
    prediction: Prediction
    union_mask: np.ndarray  # bool, original (H, W): union of the lesions
    # ``[les.mask for les in prediction.lesions]``, the same objects; ``.full()`` is the (H, W) bool
    # mask. Kept cropped: a weak model can find dozens of components, 13.6 MB each at full mammogram size.
    lesion_masks: list[CroppedMask]


class StagedPrediction(NamedTuple):
    """``Predictor.predict_stages``'s result: the prediction and what it was made from on the prepared
    grid, for a stage that follows the lesion model (``inference.compose``)."""

    result: ImagePrediction
    image: LoadedImage  # the original image as read
    prepared: Any  # ``preprocess_image``'s result: pixels, breast mask and Geometry of the prepared grid
    components: list[LesionComponent]  # the lesions on the prepared grid, before mapping back
    kept: list[int]  # ``components`` index of each ``result.prediction.lesions`` entry (some map outside)


@dataclass(frozen=True, kw_only=True)
class BundleSettings(InferenceSettings):
    """What inference needs from a model card, checked once."""

    name: str
    version: str
    spec: PreprocessSpec

    @classmethod
    def from_card(cls, card: ModelCard) -> "BundleSettings":
        """From a validated card (``models.card.ModelCard``: types and bounds already checked)."""
        t, tiling = card.thresholds, card.tiling
        return cls(name=card.name, version=card.version, spec=card.preprocessing, class_names=tuple(card.class_names),
                   threshold=t.probability, min_area=t.min_area, max_lesions=t.max_lesions, tile=tiling.tile,
                   overlap=tiling.overlap, mode=tiling.mode, batch_size=tiling.batch_size, tta=tuple(tiling.tta))


class Predictor:
    """A bundle (name, folder, or an already loaded ``(model, card)``) ready to predict images.

    Safe to share between threads (a server): everything that changes the model (device, eval mode,
    channels-last weights) happens once here, and a call changes nothing global. ``num_threads`` is
    a PROCESS setting (torch's intra-op thread count), applied here once when given, never per call.
    A ``(model, card)`` pair is used in place: the model is moved and converted, not copied.
    """

    TASKS = ("segment", "detect")  # tasks whose output is lesions (``mammocad.tasks``); classify gets its own runner

    def __init__(self, bundle: str | Path | tuple[nn.Module, dict[str, Any] | ModelCard],
                 device: str | torch.device | None = "auto", batch_size: int | None = None, autocast: str = "auto",
                 voi: int | str | None = 0, num_threads: int | None = None):
        from mammocad.models.bundle import load_bundle, read_card, resolve_bundle
        from mammocad.tasks.tiling import AUTOCAST

        if autocast not in AUTOCAST:
            raise ConfigError("--autocast", f"unknown autocast {autocast!r}; choose one of {', '.join(AUTOCAST)}")
        if num_threads is not None and num_threads < 1:
            raise ConfigError("--threads", f"must be at least 1, got {num_threads}")
        if batch_size is not None and not 1 <= batch_size <= MAX_BATCH:  # the card's tiling.batch_size bound
            raise ConfigError("--batch-size", f"must be between 1 and {MAX_BATCH}, got {batch_size}")
        self.device = resolve_device(device)
        model: nn.Module | None = None
        if isinstance(bundle, tuple):
            model, card = bundle
            card = card if isinstance(card, ModelCard) else validate_card(card, "model card")
            source: str | Path = card.name
        else:
            source = resolve_bundle(bundle)
            card = read_card(source)
        if card.task not in self.TASKS:  # refused before any weights are read
            raise ConfigError(source, f"model {card.name} is a {card.task} model; this command runs "
                                      f"{' and '.join(self.TASKS)} models")
        if model is None:
            model, card = load_bundle(source, device=self.device, card=card)
        self.model, self.card = model, card
        self.task = get_task(card.task, str(source))
        self.model.to(self.device).eval()
        # oneDNN's native layout, once: predict_tiled feeds channels-last tiles and changes no weights per call
        self.model.to(memory_format=torch.channels_last)
        if num_threads:
            torch.set_num_threads(int(num_threads))
        self.settings = BundleSettings.from_card(card)
        self.channel_names = self.task.output_names(self.model, self.settings)
        self.batch_size = int(batch_size or self.settings.batch_size)
        # "auto" follows the card: a model validated in fp32 is not run in bf16 behind its back
        self.autocast = card.tiling.autocast if autocast == "auto" else autocast
        self.voi = voi

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def version(self) -> str:
        return self.settings.version

    @property
    def modality(self) -> str:
        return self.settings.spec.modality

    def infer(self, pixels: np.ndarray, breast_mask: np.ndarray | None) -> Any:
        """The task's raw output on a preprocessed image (the bundle's tiling, TTA and autocast):
        segment: (C, H, W) probabilities; detect: merged instances (``tasks.detect.Detections``)."""
        return self.task.infer(self.model, pixels, breast_mask, self.settings, batch_size=self.batch_size,
                               autocast=self.autocast, device=self.device)

    def lesions(self, raw: Any, breast_mask: np.ndarray | None) -> list[LesionComponent]:
        """Lesion components of ``raw`` (the bundle's threshold, minimum area, max lesions)."""
        return self.task.find_lesions(raw, breast_mask, self.settings, self.channel_names)

    def predict_image(self, image: str | Path | LoadedImage, laterality: str | None = None, *,
                      candidate_threshold: float | None = DEFAULT_CANDIDATE_THRESHOLD,
                      max_candidates: int | None = DEFAULT_MAX_CANDIDATES) -> ImagePrediction:
        """Predict one image; boxes, areas and masks are in the original image's pixel grid.

        ``prediction.lesions`` are the bundle's output (threshold, minimum area, max lesions);
        ``prediction.candidates`` every component at ``candidate_threshold`` (``task.find_candidates``;
        None: no candidates), mapped to the original grid the same way. Evaluation draws its FROC
        curve from the candidates and marks the lesions as the bundle's operating point.

        ``laterality`` (L/R) defaults to the DICOM tag; when it disagrees with the pixels the pixels
        win and the disagreement is recorded in ``attributes["preprocessing_notes"]``.
        """
        return self.predict_stages(image, laterality, candidate_threshold=candidate_threshold,
                                   max_candidates=max_candidates).result

    def predict_stages(self, image: str | Path | LoadedImage, laterality: str | None = None, *,
                       candidate_threshold: float | None = DEFAULT_CANDIDATE_THRESHOLD,
                       max_candidates: int | None = DEFAULT_MAX_CANDIDATES) -> StagedPrediction:
        """``predict_image`` with the prepared image and the prepared-grid lesions it came from."""
        from mammocad.inference.postprocess import components_to_original, lesions_to_original, union_mask_original
        from mammocad.preprocess.pipeline import preprocess_image

        if not isinstance(image, LoadedImage):
            image = read_image(image, voi=self.voi)
        meta = image.meta
        spec = self.settings.spec
        pre = preprocess_image(image, spec, laterality=laterality or meta.get("laterality"))
        raw = self.infer(pre.pixels, pre.breast_mask)
        components = self.lesions(raw, pre.breast_mask)
        by_index = components_to_original(components, pre.geometry)
        kept = sorted(by_index)
        mapped = [by_index[k] for k in kept]
        union = union_mask_original(mapped, image.shape)
        candidates, search = [], None
        if candidate_threshold is not None:
            found, search = self.task.find_candidates(raw, pre.breast_mask, self.settings, self.channel_names,
                                            candidate_threshold, max_candidates)
            candidates = lesions_to_original(found, pre.geometry)
        notes = list(pre.notes)
        image_modality = (meta.get("modality") or "").upper() or None
        if image_modality in ("MG", "US") and image_modality != spec.modality:
            notes.append(f"the image's DICOM modality is {image_modality} but the model {self.name} is for {spec.modality}")
        attributes = {
            "task": self.card.task, "modality": spec.modality, "image_modality": image_modality,
            "class_names": list(self.settings.class_names),
            "threshold": self.settings.threshold, "min_area_prepared_pixels": self.settings.min_area,
            "max_lesions": self.settings.max_lesions,
            "max_lesion_probability": self.task.max_score(raw, pre.breast_mask),
            "preprocessing_notes": notes, "input_notes": list(meta.get("notes") or []),
            "laterality_tag": meta.get("laterality"), "laterality_from_pixels": pre.laterality_from_pixels,
            "view": meta.get("view"), "geometry": pre.geometry.to_dict(),
        }
        if search is not None:
            attributes["candidate_search"] = search
        if meta.get("format") == "dicom":
            attributes["voi"] = meta.get("voi")
            attributes["dicom"] = {k: meta.get(k) for k in ("study_uid", "series_uid", "sop_uid", "sop_class_uid",
                                                            "patient_id", "frame", "pixel_spacing")}
        prediction = Prediction(image_path=str(image.path), image_size=image.shape, model_name=self.name,
                                model_version=self.version, lesions=mapped, attributes=attributes,
                                candidates=candidates)
        return StagedPrediction(ImagePrediction(prediction, union, [les.mask for les in mapped]), image, pre,
                                components, kept)

