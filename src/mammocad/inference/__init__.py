"""Whole-image inference on original images: ``Predictor`` (read -> preprocess -> the task's inference on
the prepared grid -> Geometry inverse -> ``Prediction``) and lesions mapped between grids (``postprocess``).

What a model's output means (tiling, lesions from probabilities) is the task's: ``mammocad.tasks``."""

from mammocad.inference.postprocess import lesions_to_original, lesions_to_prepared, union_mask_original

__all__ = ["lesions_to_original", "lesions_to_prepared", "union_mask_original"]
