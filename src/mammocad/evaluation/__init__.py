"""Evaluation: segmentation metrics, lesion detection read off a segmentation (FROC), patient-resampled
bootstrap CIs, and the JSON + Markdown report writers."""

from mammocad.evaluation.bootstrap import ConfidenceInterval, MetricValue, bootstrap_ci, grouped_mean_ci
from mammocad.evaluation.lesion_detection import (DetectionImage, DetectionReport, evaluate_lesion_detection,
                                                  lesion_masks)
from mammocad.evaluation.report import write_report
from mammocad.evaluation.segmentation import EvalItem, SegmentationReport, evaluate_segmentation

__all__ = [
    "ConfidenceInterval", "DetectionImage", "DetectionReport", "EvalItem", "MetricValue",
    "SegmentationReport", "bootstrap_ci", "evaluate_lesion_detection",
    "evaluate_segmentation", "grouped_mean_ci", "lesion_masks", "write_report",
]
