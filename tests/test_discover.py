"""Input discovery (``io.discover``): DICOM told by content (no suffix, no preamble), one folder walk
that reports every path it does not use, the breast modality of a DICOM header, input identity."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import shared_path
from mammocad.errors import DicomError
from mammocad.io import discover
from mammocad.io.discover import NonBreastModalityError, breast_modality, file_sha256, find_images, image_kind, is_dicom_file
from mammocad.io.images import read_image
from mammocad.io.outdir import claim_output_dir


def test_suffixless_text_is_not_dicom_but_preambleless_bytes_must_parse(tmp_path):
    # The old check said True for any suffix-less file over 8 bytes (LICENSE, README, Makefile).
    (tmp_path / "LICENSE").write_text("MIT License\n\nCopyright (c) 2024 someone\n")
    assert not is_dicom_file(tmp_path / "LICENSE") and image_kind(tmp_path / "LICENSE") is None
    # Starts like a preamble-less data set (tag 0008,0005 explicit VR CS) but parses into nothing.
    (tmp_path / "fake").write_bytes(b"\x08\x00\x05\x00CS\x0a\x00" + bytes(range(256)) * 8)
    assert not is_dicom_file(tmp_path / "fake")
    (tmp_path / "named.dcm").write_bytes(b"broken")  # named as DICOM: the reader, not the walk, says it is broken
    assert is_dicom_file(tmp_path / "named.dcm")
    assert image_kind(tmp_path / "x.PNG") == "plain"  # by suffix, not opened


@pytest.mark.realdata
def test_real_dicom_without_suffix_or_preamble():
    mg = shared_path("dicom", "dicom-test-files", "MG1_J2KI")  # a real mammogram, no suffix
    chest = shared_path("dicom", "fo-dicom", "CR-MONO1-10-chest")  # ACR-NEMA style: no preamble, no File Meta
    assert mg.read_bytes()[128:132] == b"DICM" and chest.read_bytes()[128:132] != b"DICM"
    assert image_kind(mg) == image_kind(chest) == "dicom"
    assert read_image(chest).shape == (440, 440)


@pytest.mark.realdata
def test_walk_of_the_shared_dicom_folder_finds_all_47_files():
    found = find_images(shared_path("dicom"))
    assert len(found.files) == 47
    assert sum(1 for f in found.files if f.suffix == "") == 13  # MG1_J2KI, RG*, NM-..., CR-MONO1-10-chest, ...
    reasons = {Path(n.path).name: n.reason for n in found.not_used}
    assert reasons["LICENSE"] == "not an image (no image suffix and no DICOM header)"
    assert reasons["DATA.md"] == "not an image (suffix '.md' and no DICOM header)"
    assert all(Path(n.path).suffix in ("", ".md", ".txt", ".rst", ".sha256") for n in found.not_used)


def _tree(root: Path) -> Path:
    """A folder with one of everything a walk must use or report."""
    pixels = np.full((20, 30), 100, np.uint8)
    for rel in ("a.png", "sub/b.jpg", "sub/deeper/c.tif"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(root / rel), pixels)
    (root / "notes.txt").write_text("not an image")
    (root / ".DS_Store").write_bytes(b"\0" * 64)
    (root / ".cache").mkdir()
    (root / ".cache" / "x.png").write_bytes(b"")
    (root / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")
    os.symlink(root / "gone.png", root / "dangling.png")
    os.symlink(root / "sub", root / "loop")  # a link to a folder: not followed
    os.symlink(root / "a.png", root / "alias.png")  # a link to a file: followed
    with claim_output_dir(root / "p1", "predict"):  # an earlier run's outputs
        assert cv2.imwrite(str(root / "p1" / "a_overlay.png"), pixels)
    (root / "p2").mkdir()  # this run's --out, not marked yet
    assert cv2.imwrite(str(root / "p2" / "a_mask.png"), pixels)
    return root


def test_walk_uses_images_and_reports_everything_else(tmp_path):
    root = _tree(tmp_path / "in")
    found = find_images(root, exclude=[root / "p2"])
    assert [f.relative_to(root).as_posix() for f in found.files] == ["a.png", "alias.png", "sub/b.jpg", "sub/deeper/c.tif"]
    reasons = {Path(n.path).relative_to(root).as_posix(): n.reason for n in found.not_used}
    assert reasons == {
        ".DS_Store": "hidden file (name starts with '.')",
        ".cache": "hidden folder (name starts with '.')",
        "DICOMDIR": "DICOMDIR index (the image files it lists are found on their own)",
        "dangling.png": "broken symbolic link (its target does not exist)",
        "loop": "symbolic link to a folder: not followed (name it as an input to include it)",
        "notes.txt": "not an image (suffix '.txt' and no DICOM header)",
        "p1": "a mammocad output folder (mammocad predict): its images are outputs, not inputs",
        "p2": "the output folder of this run",
    }
    flat = find_images(root, recursive=False, exclude=[root / "p2"])
    assert [f.name for f in flat.files] == ["a.png", "alias.png"]
    assert {Path(n.path).name: n.reason for n in flat.not_used}["sub"].startswith("subfolder: not searched")
    # a mammocad output folder named as the folder to walk is refused as a whole
    assert find_images(root / "p1").files == [] and find_images(root / "p1").not_used[0].path == str(root / "p1")


def test_unreadable_folder_is_reported_not_fatal(tmp_path, monkeypatch):
    root = _tree(tmp_path / "in")
    real_scandir = os.scandir

    def denied(path):  # chmod 000 does not stop root, which the tests may run as
        if Path(path) == root / "sub":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(discover.os, "scandir", denied)
    found = find_images(root)
    assert [f.name for f in found.files] == ["a.png", "alias.png", "a_mask.png"]
    assert {"path": str(root / "sub"), "reason": "cannot read folder (Permission denied)"} in [n.to_dict() for n in found.not_used]


@pytest.mark.realdata
def test_breast_modality_from_real_dicom_headers():
    assert breast_modality(shared_path("dicom", "fo-dicom", "GH133.dcm")) == "MG"
    assert breast_modality(shared_path("dicom", "dicom-test-files", "MG1_J2KI")) == "MG"  # RG modality, MLO view
    with pytest.raises(NonBreastModalityError, match="modality DX is neither"):
        breast_modality(shared_path("dicom", "highdicom", "dx_image.dcm"))  # a chest DX
    with pytest.raises(NonBreastModalityError, match=r"CT_small\.dcm: modality CT is neither"):
        breast_modality(shared_path("dicom", "pydicom", "CT_small.dcm"))
    with pytest.raises(DicomError) as err:
        breast_modality(shared_path("dicom", "pydicom", "no_meta.dcm"))  # unreadable: not a modality refusal
    assert not isinstance(err.value, NonBreastModalityError)
    assert breast_modality(Path("film.png")) is None  # plain images carry no modality


def test_file_sha256_streams_the_bytes(tmp_path):
    data = os.urandom(3 * (1 << 20) + 17)  # more than one chunk
    (tmp_path / "x.dcm").write_bytes(data)
    assert file_sha256(tmp_path / "x.dcm") == hashlib.sha256(data).hexdigest()
    assert file_sha256(tmp_path / "x.dcm", chunk=1000) == hashlib.sha256(data).hexdigest()


@pytest.mark.realdata
def test_preambleless_dicom_in_a_dicomdir_tree(tmp_path):
    src = shared_path("dicom", "fo-dicom", "CR-MONO1-10-chest")
    (tmp_path / "DICOM" / "ST000" / "SE000").mkdir(parents=True)
    shutil.copy(src, tmp_path / "DICOM" / "ST000" / "SE000" / "IM0001")
    assert [f.name for f in find_images(tmp_path).files] == ["IM0001"]


def test_unreadable_file_is_reported_with_its_cause(tmp_path, monkeypatch):
    (tmp_path / "IM0001").write_bytes(b"\0" * 200)
    real_head = discover._head

    def denied(path, n=132):  # chmod 000 does not stop root, which the tests may run as
        if path.name == "IM0001":
            raise PermissionError(13, "Permission denied", str(path))
        return real_head(path, n)

    monkeypatch.setattr(discover, "_head", denied)
    found = find_images(tmp_path)
    assert found.files == [] and [n.to_dict() for n in found.not_used] == [
        {"path": str(tmp_path / "IM0001"), "reason": "cannot read (Permission denied)"}]
    assert not is_dicom_file(tmp_path / "IM0001")  # the predicate itself does not raise
