"""Perceptual hashes of prepared images and the near-duplicate search the split audit runs.

The hash is ``imagehash.phash`` (64-bit DCT hash) of a small, histogram-equalised 8-bit copy of the
prepared image: the same picture exported twice (another patient id, another file format, other
windowing) hashes to within a few bits. Equalising first matters for mammograms: their low
frequencies are dominated by the breast silhouette, and on mini-MIAS plain phash put 14 pairs of
different patients' films within 4 bits, equalised phash 1 (and it makes the hash invariant to
monotonic intensity changes such as another VOI window).

A 64-bit hash is still coarse for thousands of similar-looking films: on the 216 prepared mini-MIAS
films 1 pair of different patients lies within 4 bits (~1 in 23k pairs, i.e. ~1000 false pairs in
a 10k-image dataset). So each candidate pair is confirmed with a 256-bit phash (``hash_size=16``,
stored as ``phash256``): there, different MIAS patients are >= 44 bits apart while re-encoded,
resized or re-windowed copies of one film mostly stay within 32 (see ``confirm_bound``).

The pairwise search is hand-written because imagehash compares one pair at a time (a Python loop
over ~50M pairs for 10k images); here it is XOR + popcount on uint64 arrays in row blocks, ~1 s
for 10k images.
"""

from __future__ import annotations

import cv2
import imagehash
import numpy as np
from PIL import Image

HASH_THUMB = 128  # long side of the 8-bit copy; phash itself works on 32x32, this only saves time
CONFIRM_FACTOR = 8  # a 64-bit candidate at distance <= d is confirmed when its 256-bit distance <= 8 d,
CONFIRM_MAX = 32  # ... and <= 32 whatever d: different MIAS films start at 44 of 256 bits
_BLOCK_ROWS = 1024  # rows per block of the distance matrix (1024 x 10k uint64 = 80 MB)


def _thumbnail(pixels: np.ndarray) -> Image.Image:
    """Small, histogram-equalised 8-bit copy of a float [0, 1] (or uint8/uint16) greyscale image."""
    a = np.asarray(pixels)
    if np.issubdtype(a.dtype, np.floating):
        a = np.clip(a, 0.0, 1.0) * 255.0
    elif a.dtype == np.uint16:
        a = a.astype(np.float32) / 257.0
    h, w = a.shape[:2]
    scale = HASH_THUMB / max(h, w)
    if scale < 1.0:
        a = cv2.resize(a.astype(np.float32), (max(1, round(w * scale)), max(1, round(h * scale))),
                       interpolation=cv2.INTER_AREA)
    return Image.fromarray(cv2.equalizeHist(np.round(a).clip(0, 255).astype(np.uint8)))


def image_hashes(pixels: np.ndarray) -> dict[str, str]:
    """``{"phash": 16 hex digits, "phash256": 64 hex digits}`` (as in cases.jsonl) from one thumbnail."""
    thumb = _thumbnail(pixels)
    return {"phash": str(imagehash.phash(thumb)), "phash256": str(imagehash.phash(thumb, hash_size=16))}


def confirm_bound(hash_distance: int) -> int:
    """Largest 256-bit distance that confirms a 64-bit candidate found within ``hash_distance``."""
    return min(CONFIRM_FACTOR * hash_distance, CONFIRM_MAX)


def hamming_hex(a: str, b: str) -> int:
    """Hamming distance of two equal-length hex hashes."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


def hashes_to_uint64(hashes: list[str]) -> np.ndarray:
    """Hex hashes (16 hex digits) as a uint64 array; ValueError names a malformed one."""
    out = np.empty(len(hashes), dtype=np.uint64)
    for i, h in enumerate(hashes):
        if not isinstance(h, str) or len(h) != 16:
            raise ValueError(f"perceptual hash {h!r} is not 16 hex digits")
        out[i] = int(h, 16)
    return out


def near_duplicate_pairs(hashes: np.ndarray, max_distance: int) -> list[tuple[int, int, int]]:
    """All pairs (i, j, distance) with i < j and Hamming distance <= ``max_distance``."""
    h = np.asarray(hashes, dtype=np.uint64)
    n = h.size
    found: list[tuple[int, int, int]] = []
    for start in range(0, n, _BLOCK_ROWS):
        block = h[start:start + _BLOCK_ROWS]
        dist = np.bitwise_count(block[:, None] ^ h[None, :])
        rows, cols = np.nonzero(dist <= max_distance)
        i = rows + start
        keep = cols > i  # each unordered pair once, no self-pairs
        for a, b in zip(i[keep].tolist(), cols[keep].tolist()):
            found.append((a, b, int(dist[a - start, b])))
    return found
