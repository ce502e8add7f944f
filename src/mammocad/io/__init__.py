"""Reading and writing images: DICOM (``dicom``), PNG/PGM/JPEG/TIFF (``images``), atomic writes."""

from mammocad.io.images import LoadedImage, read_image

__all__ = ["LoadedImage", "read_image"]
