"""Preprocessing with an invertible, recorded geometry."""

from mammocad.preprocess.geometry import Geometry

__all__ = ["Geometry"]
