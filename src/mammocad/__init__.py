"""mammocad: breast-lesion detection, classification and segmentation toolkit."""

__version__ = "0.1.0"

from mammocad.errors import MammocadError  # noqa: E402

__all__ = ["MammocadError", "__version__"]
