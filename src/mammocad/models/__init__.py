"""Segmentation models by name: ``create_model("unet", num_classes=3)``; see ``registry``."""

from mammocad.models.registry import create_model, list_models, model_config, model_from_config, register_model

__all__ = ["create_model", "list_models", "model_config", "model_from_config", "register_model"]
