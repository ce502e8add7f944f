"""Whole-image inference: breast-aware tiling (``tiling``) and probability map -> lesions (``postprocess``)."""

from mammocad.inference.postprocess import (
    CroppedMask,
    LesionComponent,
    lesions_to_original,
    probability_to_lesions,
    union_mask_original,
)
from mammocad.inference.tiling import TilePlan, plan_tiles, predict_tiled

__all__ = [
    "CroppedMask",
    "LesionComponent",
    "TilePlan",
    "lesions_to_original",
    "plan_tiles",
    "predict_tiled",
    "probability_to_lesions",
    "union_mask_original",
]
