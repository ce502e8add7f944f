"""One model bundle, loaded once, predicting lesions on whole images in their ORIGINAL pixel grid.

image (DICOM / PNG / PGM / JPEG, or a LoadedImage) -> ``preprocess_image`` with the bundle's spec
(MG: breast crop, canonical flip, resize; US: scan-area crop, resize) -> ``predict_tiled`` ->
``probability_to_lesions`` (threshold, min area, inside the breast) -> ``lesions_to_original``
through the Geometry -> ``Prediction`` + masks of the original image's size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from mammocad.devices import resolve_device
from mammocad.errors import ConfigError
from mammocad.inference.postprocess import CroppedMask, LesionComponent, lesion_label_map
from mammocad.io.images import LoadedImage, read_image
from mammocad.preprocess.pipeline import PreprocessSpec
from mammocad.records import Prediction


class ImagePrediction(NamedTuple):
    """``predict_image``'s result; unpacks as ``prediction, union_mask, lesion_masks``."""

    prediction: Prediction  # boxes, scores, classes in original pixel coordinates
    union_mask: np.ndarray  # bool, original (H, W): union of the lesions
    # one per ``prediction.lesions``, on the original grid; ``.full()`` is the (H, W) bool mask. Kept
    # cropped: a weak model can find dozens of components, 13.6 MB each at full mammogram size.
    lesion_masks: list[CroppedMask]


@dataclass(frozen=True, kw_only=True)
class InferenceSettings:
    """Tiling and post-processing: what turns a model's output into lesions and a label map. One
    definition for ``Predictor`` (read from a model card) and for validation during training (read
    from the config's ``inference`` section, which becomes the card), so the validation Dice that
    drives early stopping and goes into the card is the Dice of what the bundle will predict."""

    name: str = "model"  # for error messages
    class_names: tuple[str, ...]  # label-map classes, background first ("background", "lesion")
    threshold: float
    min_area: int
    tile: int
    overlap: float
    mode: str
    batch_size: int
    max_lesions: int | None = None  # keep the k highest-scoring components (None = all)
    tta: tuple[str, ...] = ()  # test-time augmentations whose probabilities are averaged ("hflip")

    @classmethod
    def from_config(cls, inference: Any, class_names: Sequence[str], name: str = "model") -> "InferenceSettings":
        """From a training config's ``inference`` section (``InferenceConfig``, already validated)."""
        return cls(name=name, class_names=tuple(str(c) for c in class_names), threshold=float(inference.threshold),
                   min_area=int(inference.min_area), tile=int(inference.tile), overlap=float(inference.overlap),
                   mode=str(inference.mode), batch_size=int(inference.batch_size),
                   max_lesions=None if inference.max_lesions is None else int(inference.max_lesions),
                   tta=tuple(str(t) for t in inference.tta))

    def channel_names(self, n_channels: int) -> tuple[str, ...]:
        """Names of the model's output channels: one sigmoid channel is the lesion class; softmax
        channels are the classes, background first."""
        if n_channels == 1 and len(self.class_names) == 2:
            return self.class_names[1:]
        if n_channels == len(self.class_names):
            return self.class_names
        raise ConfigError(self.name, f"model has {n_channels} output channel(s) but the card names classes {list(self.class_names)}")


@dataclass(frozen=True, kw_only=True)
class BundleSettings(InferenceSettings):
    """What inference needs from a model card, checked once."""

    name: str
    version: str
    spec: PreprocessSpec

    @classmethod
    def from_card(cls, card: dict[str, Any], source: str | Path) -> "BundleSettings":
        try:
            spec = PreprocessSpec.model_validate(card.get("preprocessing") or card.get("preprocess"))
        except ValueError as exc:
            raise ConfigError(source, f"model card: invalid or missing 'preprocessing' spec ({exc})") from None
        thresholds, tiling = card.get("thresholds") or {}, card.get("tiling") or {}
        names = tuple(str(c) for c in card.get("class_names") or ("background", "lesion"))
        try:
            settings = cls(name=str(card.get("name") or Path(str(source)).name), version=str(card.get("version") or "unknown"),
                           spec=spec, class_names=names,
                           threshold=float(thresholds.get("probability", thresholds.get("threshold", 0.5))),
                           min_area=int(thresholds.get("min_area", 16)), tile=int(tiling.get("tile", 256)),
                           overlap=float(tiling.get("overlap", 0.25)), mode=str(tiling.get("mode", "sliding")),
                           batch_size=int(tiling.get("batch_size", 4)),
                           max_lesions=None if thresholds.get("max_lesions") is None else int(thresholds["max_lesions"]),
                           tta=tuple(str(t) for t in tiling.get("tta") or ()))
        except (TypeError, ValueError) as exc:
            raise ConfigError(source, f"model card: bad thresholds/tiling ({exc})") from None
        if set(settings.tta) - {"hflip"} or (settings.max_lesions is not None and settings.max_lesions < 1):
            raise ConfigError(source, f"model card: unknown tta {list(settings.tta)} or max_lesions {settings.max_lesions}")
        if len(names) < 2 or not 0.0 < settings.threshold < 1.0:
            raise ConfigError(source, f"model card: need >= 2 class names (background first) and a threshold in (0, 1), "
                                      f"got {list(names)} and {settings.threshold}")
        return settings


def tiled_probabilities(model: nn.Module, pixels: np.ndarray, breast_mask: np.ndarray | None, settings: InferenceSettings,
                        *, batch_size: int | None = None, autocast: str = "auto", device: torch.device | None = None,
                        num_threads: int | None = None) -> np.ndarray:
    """(C, H, W) probabilities of a preprocessed image: ``settings``' tiling, then its test-time
    augmentation (``hflip``: averaged with the mirrored image's prediction, mirrored back)."""
    from mammocad.inference.tiling import predict_tiled

    s = settings

    def run(img: np.ndarray, breast: np.ndarray | None) -> np.ndarray:
        return predict_tiled(model, img, tile=s.tile, overlap=s.overlap, batch_size=int(batch_size or s.batch_size),
                             breast_mask=breast, mode=s.mode, autocast=autocast, device=device, num_threads=num_threads)

    probs = run(pixels, breast_mask)
    if "hflip" in s.tta:
        flipped = run(np.ascontiguousarray(pixels[:, ::-1]),
                      None if breast_mask is None else np.ascontiguousarray(breast_mask[:, ::-1]))
        probs = 0.5 * (probs + flipped[:, :, ::-1])
    return probs


def find_lesions(probs: np.ndarray, breast_mask: np.ndarray | None, settings: InferenceSettings,
                 channel_names: tuple[str, ...]) -> list[LesionComponent]:
    """Lesion components on the grid of ``probs``: ``settings``' threshold and minimum area inside
    the breast, then its ``max_lesions`` highest-scoring ones."""
    from mammocad.inference.postprocess import probability_to_lesions

    s = settings
    found = probability_to_lesions(probs, threshold=s.threshold, min_area=s.min_area, class_names=channel_names,
                                   breast_mask=breast_mask)
    if s.max_lesions is not None:
        found = sorted(found, key=lambda c: -c.score)[:s.max_lesions]
    return found


def predict_label_map(model: nn.Module, pixels: np.ndarray, breast_mask: np.ndarray | None, settings: InferenceSettings,
                      *, autocast: str = "auto") -> tuple[np.ndarray, list[LesionComponent]]:
    """(uint8 label map over ``settings.class_names``, lesions) of a preprocessed image, exactly as a
    bundle with these settings predicts it (``tiled_probabilities`` -> ``find_lesions`` ->
    ``lesion_label_map``); what training-time validation scores."""
    probs = tiled_probabilities(model, pixels, breast_mask, settings, autocast=autocast)
    found = find_lesions(probs, breast_mask, settings, settings.channel_names(int(model.num_classes)))
    return lesion_label_map(found, probs.shape[1:], settings.class_names), found


def _output_channels(model: nn.Module, settings: BundleSettings) -> int:
    n = getattr(model, "num_classes", None)
    if n is None:
        raise ConfigError(settings.name, "model has no num_classes attribute")
    return int(n)


class Predictor:
    """A bundle (name, folder, or an already loaded ``(model, card)``) ready to predict images."""

    def __init__(self, bundle: str | Path | tuple[nn.Module, dict[str, Any]], device: str | torch.device | None = "auto",
                 batch_size: int | None = None, autocast: str = "auto", voi: int | str | None = 0,
                 num_threads: int | None = None):
        from mammocad.inference.tiling import AUTOCAST
        from mammocad.models.bundle import load_bundle

        if autocast not in AUTOCAST:
            raise ConfigError("--autocast", f"unknown autocast {autocast!r}; choose one of {', '.join(AUTOCAST)}")
        self.device = resolve_device(device)
        if isinstance(bundle, tuple):
            self.model, self.card = bundle
            self.model.to(self.device).eval()
            source: str | Path = str(self.card.get("name", "bundle"))
        else:
            self.model, self.card = load_bundle(bundle, device=self.device)
            source = bundle
        self.settings = BundleSettings.from_card(self.card, source)
        self.channel_names = self.settings.channel_names(_output_channels(self.model, self.settings))
        self.batch_size = int(batch_size or self.settings.batch_size)
        self.autocast, self.voi, self.num_threads = autocast, voi, num_threads

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def version(self) -> str:
        return self.settings.version

    @property
    def modality(self) -> str:
        return self.settings.spec.modality

    def probabilities(self, pixels: np.ndarray, breast_mask: np.ndarray | None) -> np.ndarray:
        """(C, H, W) probabilities of a preprocessed image (the bundle's tiling, TTA and autocast)."""
        return tiled_probabilities(self.model, pixels, breast_mask, self.settings, batch_size=self.batch_size,
                                   autocast=self.autocast, device=self.device, num_threads=self.num_threads)

    def lesions(self, probs: np.ndarray, breast_mask: np.ndarray | None) -> list[LesionComponent]:
        """Lesion components on the grid of ``probs`` (the bundle's threshold, minimum area, max lesions)."""
        return find_lesions(probs, breast_mask, self.settings, self.channel_names)

    def label_map(self, lesions: list[LesionComponent], shape: tuple[int, int]) -> np.ndarray:
        """uint8 label map (``settings.class_names`` indices) of ``lesions`` on a grid of ``shape``."""
        return lesion_label_map(lesions, shape, self.settings.class_names)

    def predict_image(self, image: str | Path | LoadedImage, laterality: str | None = None) -> ImagePrediction:
        """Predict one image; boxes, areas and masks are in the original image's pixel grid.

        ``laterality`` (L/R) defaults to the DICOM tag; when it disagrees with the pixels the pixels
        win and the disagreement is recorded in ``attributes["preprocessing_notes"]``.
        """
        from mammocad.inference.postprocess import lesions_to_original, union_mask_original
        from mammocad.preprocess.pipeline import preprocess_image

        if not isinstance(image, LoadedImage):
            image = read_image(image, voi=self.voi)
        meta = image.meta
        spec = self.settings.spec
        pre = preprocess_image(image, spec, laterality=laterality or meta.get("laterality"))
        probs = self.probabilities(pre.pixels, pre.breast_mask)
        mapped = lesions_to_original(self.lesions(probs, pre.breast_mask), pre.geometry)
        union = union_mask_original(mapped, image.shape)
        lesion_prob = probs[0] if probs.shape[0] == 1 else 1.0 - probs[0]
        notes = list(pre.notes)
        image_modality = (meta.get("modality") or "").upper() or None
        if image_modality in ("MG", "US") and image_modality != spec.modality:
            notes.append(f"the image's DICOM modality is {image_modality} but the model {self.name} is for {spec.modality}")
        attributes = {
            "modality": spec.modality, "image_modality": image_modality, "class_names": list(self.settings.class_names),
            "threshold": self.settings.threshold, "min_area_prepared_pixels": self.settings.min_area,
            "max_lesion_probability": float(lesion_prob[pre.breast_mask].max()) if pre.breast_mask.any() else 0.0,
            "preprocessing_notes": notes, "input_notes": list(meta.get("notes") or []),
            "laterality_tag": meta.get("laterality"), "laterality_from_pixels": pre.laterality_from_pixels,
            "view": meta.get("view"), "geometry": pre.geometry.to_dict(),
        }
        if meta.get("format") == "dicom":
            attributes["voi"] = meta.get("voi")
            attributes["dicom"] = {k: meta.get(k) for k in ("study_uid", "series_uid", "sop_uid", "sop_class_uid",
                                                            "patient_id", "frame", "pixel_spacing")}
        prediction = Prediction(image_path=str(image.path), image_size=image.shape, model_name=self.name,
                                model_version=self.version, lesions=[les for les, _ in mapped], attributes=attributes)
        return ImagePrediction(prediction, union, [m for _, m in mapped])

