"""A ``mammocad predict`` output folder as evaluation reads it: its per-image JSONs, from ONE model,
matched to prepared cases by the SHA-256 of the image file each was made from (``input_sha256``,
``input_bytes``), never by file names: two datasets can hold different images under the same last
path parts, and an image can change after it was predicted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mammocad.errors import InputError
from mammocad.records import CroppedMask, Prediction


def is_predictions_folder(path: str | Path) -> bool:
    """A ``mammocad predict`` output folder, as opposed to a model bundle: no model card, and its
    summary.json, its output marker (written when the run starts, so an interrupted run counts), or
    at least one prediction JSON."""
    from mammocad.inference.predict_run import SUMMARY_FILE
    from mammocad.io.outdir import MARKER_FILE

    p = Path(path)
    if not p.is_dir() or (p / "model.json").is_file():
        return False
    if (p / SUMMARY_FILE).is_file():
        return True
    try:
        if "mammocad predict" in (p / MARKER_FILE).read_text(encoding="utf-8"):
            return True
    except OSError:
        pass
    return False


class ContentHashes:
    """SHA-256 of image files, computed once per file (a case list may name one file twice)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int, int], str] = {}

    def __call__(self, path: str | Path) -> tuple[str | None, int | None]:
        """(sha256, size in bytes); (None, size or None) when the file cannot be read."""
        from mammocad.io.discover import file_sha256

        p = Path(path)
        try:
            st = p.stat()
        except OSError:
            return None, None
        key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
        if key not in self._cache:
            try:
                self._cache[key] = file_sha256(p)
            except OSError:
                return None, int(st.st_size)
        return self._cache[key], int(st.st_size)


def _model_key(record: dict[str, Any]) -> str:
    return f"{record.get('model_name')} {record.get('model_version')}"


def _candidate_key(record: dict[str, Any]) -> tuple | None:
    search = (record.get("attributes") or {}).get("candidate_search")
    if not isinstance(search, dict):
        return None
    return (search.get("probability_threshold"), search.get("min_area_prepared_pixels"), search.get("max_candidates"))


class PredictionsFolder:
    """The per-image JSONs of a ``mammocad predict`` output, indexed by the content of their input.

    Refuses a folder holding predictions of more than one model (name or version), of different
    class sets, or with candidates searched differently: one report must describe one model."""

    def __init__(self, root: str | Path):
        from mammocad.inference.predict_run import SUMMARY_FILE

        self.root = Path(root)
        self.records: list[tuple[Path, dict[str, Any]]] = []
        for path in sorted(self.root.glob("*.json")):
            if path.name == SUMMARY_FILE:
                continue
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise InputError(path, f"unreadable prediction ({exc})") from None
            if not isinstance(record, dict) or "input" not in record or "lesions" not in record:
                continue  # not one of ours
            self.records.append((path, record))
        if not self.records:
            raise InputError(self.root, "no prediction JSON files (expected the output folder of `mammocad predict`)")
        models = sorted({_model_key(r) for _, r in self.records})
        if len(models) > 1:
            raise InputError(self.root, f"holds predictions of {len(models)} models ({'; '.join(models)}): "
                                        "evaluate each model's predictions from a folder of their own")
        self.models = models
        names = {tuple((r.get("attributes") or {}).get("class_names") or ("background", "lesion")) for _, r in self.records}
        if len(names) != 1:
            raise InputError(self.root, f"predictions made with different class sets {sorted(names)}: evaluate them separately")
        self.class_names = list(names.pop())
        searches = {_candidate_key(r) for _, r in self.records}
        self.n_without_candidates = sum(_candidate_key(r) is None for _, r in self.records)
        searches.discard(None)
        if len(searches) > 1:
            raise InputError(self.root, "candidates searched with different settings (probability threshold, min area, "
                                        f"cap) {sorted(searches, key=str)}: predict them again with one")
        # the curve needs candidates on EVERY image; a folder predicted partly before they existed
        # is scored on its lesions throughout (said in the notes)
        self.use_candidates = self.n_without_candidates == 0
        self.reference_attributes: dict[str, Any] = dict(self.records[0][1].get("attributes") or {})
        self.by_sha: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
        self.by_path: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
        for path, record in self.records:
            if record.get("input_sha256"):
                self.by_sha.setdefault(str(record["input_sha256"]), []).append((path, record))
            self.by_path.setdefault(str(record["input"]), []).append((path, record))
        self.matched_by_path: list[str] = []  # case ids matched without a content hash (see the notes)

    @property
    def candidate_threshold(self) -> float | None:
        search = self.reference_attributes.get("candidate_search") or {}
        return search.get("probability_threshold") if self.use_candidates else None

    def match(self, pc: Any, hashes: ContentHashes) -> tuple[Path, dict[str, Any]]:
        """The prediction made from ``pc``'s original image file: same SHA-256 (and size). A
        prediction of the same path with other content, or none at all, is a one-line error. When
        the case's image cannot be read here, the resolved path (and the size, when known) decide."""
        image = Path(pc.case.image_path)
        resolved = str(image.resolve())
        sha, size = hashes(image)
        same_path = self.by_path.get(resolved, [])
        if sha is not None:
            found = [(p, r) for p, r in self.by_sha.get(sha, []) if r.get("input_bytes") in (None, size)]
            if found:
                return next(((p, r) for p, r in found if r["input"] == resolved), found[0])
            for path, record in same_path:
                if record.get("input_sha256"):
                    raise InputError(path, f"predicts {resolved} as it was (sha256 {str(record['input_sha256'])[:12]}…), "
                                           f"but that file, the image of case {pc.case_id}, now has other content "
                                           f"(sha256 {sha[:12]}…): predict it again")
            unhashed = [(p, r) for p, r in same_path if not r.get("input_sha256")]
            if unhashed:  # written before predictions recorded their input's hash
                self.matched_by_path.append(pc.case_id)
                return unhashed[0]
            raise InputError(self.root, f"no prediction for case {pc.case_id} ({image}, sha256 {sha[:12]}…)")
        found = [(p, r) for p, r in same_path if size is None or r.get("input_bytes") in (None, size)]
        if not found:
            raise InputError(self.root, f"no prediction for case {pc.case_id} ({image}; the file cannot be read here, "
                                        "so it was looked up by path and size)")
        self.matched_by_path.append(pc.case_id)
        return found[0]

    def prediction(self, json_path: Path, record: dict[str, Any]) -> Prediction:
        """The record as a ``Prediction`` with every mask in memory: lesions from their PNG files,
        candidates from their RLE."""
        from mammocad.io.images import read_plain_image

        try:
            prediction = Prediction.from_dict(record)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(json_path, f"not a valid prediction record ({type(exc).__name__}: {exc})") from None
        size = tuple(prediction.image_size)
        for lesion, d in zip(prediction.lesions, record["lesions"]):
            mask_path = self.root / str(d.get("mask") or d.get("mask_path"))
            full = read_plain_image(mask_path).pixels > 0
            if full.shape != size:
                raise InputError(mask_path, f"mask is {full.shape[1]}x{full.shape[0]}, the image {size[1]}x{size[0]}")
            lesion.mask = CroppedMask.from_full(full)
        for k, candidate in enumerate(prediction.candidates):
            if candidate.mask is None or tuple(candidate.mask.image_size) != size:
                raise InputError(json_path, f"candidate {k} has no mask_rle of the image's size {list(size)}")
        return prediction
