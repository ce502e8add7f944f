"""Synthetic mammograms with exact ground truth, for tests, the demo and benchmarks.

No public generator draws mammograms with pixel-exact lesion masks (VICTRE/OpenVCT simulate physics
at minutes per image and need their own toolchains), so the picture is composed here from a few
cheap, well-understood parts:

- breast outline: a super-ellipse half attached to the chest wall, with low-frequency wobble; MLO
  views reach the top edge (axilla) and carry the pectoral muscle triangle in the top corner;
- compressed-thickness profile: full thickness inside, falling off towards the skin, plus a thin
  denser skin line;
- fibroglandular tissue: power-law (1/f^beta, beta ~ 3) noise, the accepted statistical model of
  mammographic background (Burgess 2001), mixed with ducts/ligaments (noise stretched along rays
  from the nipple), thresholded softly by the breast density and fading towards the skin and the
  chest wall;
- lesions: circumscribed masses (benign), spiculated masses (malignant, core + tapered spicules),
  calcification clusters (5-20 specks; benign round and uniform, malignant pleomorphic).

Display convention (checked on mini-MIAS, /work/shared/data/mias: 25 of 30 left films have the
chest wall on the image's left, 26 of 30 right films on the image's right, as in the standard
back-to-back hanging): a LEFT breast is drawn with the chest wall on the image's LEFT and the nipple
pointing right, a RIGHT breast mirrored. The MLO pectoral muscle sits in the top corner on the
chest-wall side. Everything is drawn for a left breast and flipped for a right one.

Ground truth: a mass mask is exactly the drawn region (its soft edge crosses half height on the mask
outline); a calcification cluster's mask is the convex hull of its specks dilated by 0.5 mm (at least
2 pixels), the region a reader outlines around a cluster, as CBIS-DDSM ROI masks do.

Sizes are physical: the detector is taken as 24 x 30 cm, so the pixel spacing is 300 mm / rows
(0.29 mm at 1024 rows, 0.073 mm at 4084) and the same seed draws the same anatomy at any size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import scipy.fft

DETECTOR_HEIGHT_MM = 300.0
TEXTURE_GRID = 1024  # long side of the grid the smooth anatomy is drawn on (upsampled afterwards)
BETA = 3.0
GAMMA_TABLE = (0.03 + np.linspace(0.0, 1.0, 16384) ** 1.6).astype(np.float32)
DENSITY_OFFSETS = {1: -1.5, 2: -0.7, 3: 0.0, 4: 0.7}  # BI-RADS density -> threshold offset


@dataclass
class SyntheticLesion:
    mask: np.ndarray  # bool HxW, the exact ground truth
    pathology: str  # "benign" | "malignant"
    kind: str  # "mass" | "calcification"
    source_label: str  # "CIRCUMSCRIBED" | "SPICULATED" | "CLUSTERED"
    attributes: dict[str, Any] = field(default_factory=dict)  # CBIS-DDSM-style words, subtlety, ...


@dataclass
class SyntheticMammogram:
    image: np.ndarray  # float32 [0, 1], HxW, display polarity (tissue bright)
    breast_mask: np.ndarray  # bool, all tissue including the pectoral muscle
    lesions: list[SyntheticLesion]
    laterality: str  # "L" | "R"
    view: str  # "CC" | "MLO"
    pectoral_mask: np.ndarray | None = None  # bool; empty in CC views
    density: int = 2  # BI-RADS breast density 1-4
    pixel_spacing_mm: float = 0.1

    @property
    def label(self) -> str:
        if not self.lesions:
            return "normal"
        return "malignant" if any(les.pathology == "malignant" for les in self.lesions) else "benign"


# ------------------------------------------------------------------------------------ texture


def power_law_noise(rng: np.random.Generator, shape: tuple[int, int], beta: float = BETA, anisotropy: float = 1.0) -> np.ndarray:
    """Zero-mean, unit-variance noise whose power spectrum falls as 1/f^beta (white noise shaped by FFT).

    ``anisotropy`` > 1 stretches the correlation along axis 0 (used for ducts in polar coordinates).
    The field is periodic; callers crop or use it as is.
    """
    h, w = shape
    white = rng.standard_normal((h, w), dtype=np.float32)
    spectrum = scipy.fft.rfft2(white)
    fy = scipy.fft.fftfreq(h).astype(np.float32)[:, None] * anisotropy
    fx = scipy.fft.rfftfreq(w).astype(np.float32)[None, :]
    f2 = fy * fy + fx * fx
    f2[0, 0] = np.inf  # no DC component
    spectrum *= f2 ** (-beta / 4.0)  # amplitude ~ f^(-beta/2)  ->  power ~ f^(-beta)
    field_ = scipy.fft.irfft2(spectrum, s=(h, w)).astype(np.float32)
    field_ -= field_.mean()
    return field_ / max(float(field_.std()), 1e-12)


def _texture_grid(shape: tuple[int, int]) -> tuple[int, int]:
    h, w = shape
    scale = min(1.0, TEXTURE_GRID / max(h, w))
    return max(8, round(h * scale)), max(8, round(w * scale))


def _upsample(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if a.shape == shape:
        return a
    return cv2.resize(a, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _duct_noise(rng: np.random.Generator, grid: tuple[int, int], nipple: tuple[float, float]) -> np.ndarray:
    """Noise stretched along rays from the nipple (ducts and ligaments converge on it), the rays bent
    by a smooth random displacement so that they curve like real ones."""
    gh, gw = grid
    polar = power_law_noise(rng, (256, 1024), beta=2.3, anisotropy=10.0)  # rows: radius, cols: angle
    polar = np.concatenate([polar, polar[:, :1]], axis=1)  # the angle wraps around
    coarse = (max(8, gh // 16), max(8, gw // 16))
    warp_x = _upsample(power_law_noise(rng, coarse, beta=3.5), grid) * (0.008 * max(gh, gw))
    warp_y = _upsample(power_law_noise(rng, coarse, beta=3.5), grid) * (0.008 * max(gh, gw))
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32)
    dx, dy = xx + warp_x - nipple[0], yy + warp_y - nipple[1]
    r = np.minimum(np.sqrt(dx * dx + dy * dy) / np.hypot(gh, gw) * 255.0, 254.0)
    phi = (np.arctan2(dy, dx) + np.pi) / (2 * np.pi) * 1024.0
    return cv2.remap(polar, phi.astype(np.float32), r.astype(np.float32), interpolation=cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE)


def _ridges(noise: np.ndarray, width: float) -> np.ndarray:
    """Thin bright lines along the zero crossings of smooth noise: ligaments, ducts, vessels."""
    return np.exp(-((noise / width) ** 2))


def _tissue(rng: np.random.Generator, grid: tuple[int, int], d_mm: np.ndarray, x_mm: np.ndarray, nipple: tuple[float, float],
            density: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(glandular fraction, linear strands, muscle texture) on the texture grid."""
    clumps = power_law_noise(rng, grid, BETA)
    fine = power_law_noise(rng, grid, 2.5)
    ducts = _duct_noise(rng, grid, nipple)
    mesh = power_law_noise(rng, grid, 2.6)
    coarse = (max(8, grid[0] // 8), max(8, grid[1] // 8))
    distribution = _upsample(power_law_noise(rng, coarse, beta=4.0), grid)
    patches = _smoothstep(_upsample(power_law_noise(rng, coarse, beta=3.0), grid) * 0.6 + 0.6)
    # Glandular tissue fades out towards the skin (widely: the dense tissue forms the usual cone
    # behind the nipple) and leaves an uneven fat layer in front of the chest wall.
    retro_fat = rng.uniform(15, 40) * (1.0 + 0.3 * distribution)
    envelope = _smoothstep(d_mm / rng.uniform(15, 40)) * (0.4 + 0.6 * _smoothstep(x_mm[None, :] / np.maximum(retro_fat, 5.0)))
    depth = d_mm / max(float(d_mm.max()), 1e-6)
    drive = 0.85 * clumps + 0.15 * fine + 0.25 * ducts + 0.5 * distribution + 1.2 * (depth - 0.35) + DENSITY_OFFSETS[density]
    glandular = envelope / (1.0 + np.exp(-np.clip(1.25 * drive, -30, 30)))
    glandular = np.clip(glandular * (1.0 + 0.12 * fine), 0.0, None)  # dense tissue is not flat either
    strands = (0.6 * _ridges(ducts, 0.14) * patches + 0.4 * _ridges(mesh, 0.1) * (1 - patches)) * _smoothstep(d_mm / 4.0)
    strands *= 1.0 - 0.7 * glandular  # lines show against fat, drown in dense tissue
    muscle = power_law_noise(rng, grid, 3.0)
    return glandular.astype(np.float32), strands.astype(np.float32), muscle


# ----------------------------------------------------------------------------------- anatomy


def _outline(rng: np.random.Generator, h: int, w: int, view: str) -> tuple[np.ndarray, tuple[float, float]]:
    """Skin outline polygon (x, y) of a left breast (chest wall at x=0) and the nipple position.

    Two super-ellipse quarters meet at the nipple; in MLO the upper one is flatter (exponent < 2),
    running straight from the axilla at the top edge down to the nipple: the teardrop of an MLO.
    """
    depth = w * rng.uniform(0.55, 0.8)
    if view == "CC":
        n_up = n_down = rng.uniform(2.0, 2.5)
        yn = h * rng.uniform(0.45, 0.55)
        b_up, b_down = h * rng.uniform(0.34, 0.45), h * rng.uniform(0.34, 0.45)
    else:  # MLO: from the axilla at the top edge down to the inframammary fold
        n_up, n_down = rng.uniform(1.3, 1.8), rng.uniform(2.0, 2.6)
        yn = h * rng.uniform(0.55, 0.66)
        x_top = depth * rng.uniform(0.4, 0.6)
        b_up = yn / (1.0 - (x_top / depth) ** n_up) ** (1.0 / n_up)
        b_down = min(h * rng.uniform(0.86, 0.96), h - 2) - yn
    theta = np.linspace(-np.pi / 2, np.pi / 2, 361)
    wobble = 1.0 + sum(rng.uniform(0, 0.02) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    c, s = np.cos(theta), np.sin(theta)
    n = np.where(s < 0, n_up, n_down)
    x = depth * np.abs(c) ** (2.0 / n) * wobble
    y = yn + np.where(s < 0, b_up, b_down) * np.sign(s) * np.abs(s) ** (2.0 / n) * wobble
    pts = np.stack([x, y], axis=1)
    pts = np.concatenate([[[-w, y[0]]], pts, [[-w, y[-1]]]])  # close the polygon beyond the chest wall
    tip = int(np.argmax(x))
    return pts, (float(x[tip]), float(y[tip]))


def _fill(shape: tuple[int, int], polygons: list[np.ndarray]) -> np.ndarray:
    """Boolean mask of polygons given in continuous edge coordinates (pixel centres at i + 0.5)."""
    canvas = np.zeros(shape, np.uint8)
    shift = 4
    fixed = [np.round((np.asarray(p, np.float64) - 0.5) * (1 << shift)).astype(np.int32) for p in polygons]
    cv2.fillPoly(canvas, fixed, 1, lineType=cv2.LINE_8, shift=shift)
    return canvas.astype(bool)


def _pectoral_polygon(rng: np.random.Generator, h: int, outline: np.ndarray) -> np.ndarray:
    """The MLO pectoral muscle: a triangle in the top chest-wall corner with a slightly convex edge."""
    top = outline[(outline[:, 1] <= 0.5) & (outline[:, 0] > 0)]
    top_width = float(top[:, 0].max()) if len(top) else float(outline[:, 0].max()) * 0.3
    pw, ph = top_width * rng.uniform(0.45, 0.8), h * rng.uniform(0.35, 0.6)
    t = np.linspace(0, 1, 50)
    bulge = rng.uniform(0.0, 0.08) * np.sin(np.pi * t)
    x, y = pw * (1 - t) + bulge * ph, ph * t + bulge * pw
    return np.concatenate([[[-2.0, -2.0], [x[0], -2.0]], np.stack([x, y], 1)[1:], [[-2.0, ph]]])


def _skin_distance(breast: np.ndarray) -> np.ndarray:
    """Pixel distance to the skin line; the chest wall and top edges are not skin (the body goes on)."""
    pad = 8
    padded = np.pad(breast, pad, mode="edge").astype(np.uint8)
    return cv2.distanceTransform(padded, cv2.DIST_L2, 5)[pad:-pad, pad:-pad]


# ------------------------------------------------------------------------------------ lesions
# Each lesion is drawn around the origin first (so that its true extent is known before it is
# placed), then rasterised at full resolution in a local window: exact masks at any image size.


def _radial_shape(rng: np.random.Generator, radius: float, harmonics: range, roughness: float, aspect: float) -> np.ndarray:
    theta = np.linspace(0, 2 * np.pi, 180, endpoint=False)
    rr = 1.0 + sum(rng.uniform(0, roughness) / np.sqrt(k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in harmonics)
    rot = rng.uniform(0, np.pi)
    x, y = radius * rr * np.cos(theta), radius * aspect * rr * np.sin(theta)
    return np.stack([x * np.cos(rot) - y * np.sin(rot), x * np.sin(rot) + y * np.cos(rot)], 1)


def _mass_shape(rng, mm: float, spiculated: bool) -> dict[str, Any]:
    radius = rng.uniform(3.5, 9.0 if spiculated else 11.0) / mm
    core = _radial_shape(rng, radius, range(2, 9) if spiculated else range(2, 5), 0.3 if spiculated else 0.12, rng.uniform(0.7, 1.0))
    spicules = []
    for _ in range(int(rng.integers(10, 24)) if spiculated else 0):
        ang, length = rng.uniform(0, 2 * np.pi), radius * rng.uniform(0.9, 2.4)
        base = max(rng.uniform(0.3, 0.7) / mm, 1.6)
        t = np.linspace(0, 1, 12)
        bend = np.cumsum(rng.normal(0, 0.025, t.size))
        direction = np.stack([np.cos(ang + bend), np.sin(ang + bend)], 1)
        normal = np.stack([-direction[:, 1], direction[:, 0]], 1)
        spine = (radius * 0.6 + length * t)[:, None] * direction
        half = np.maximum(base * (1 - t), 1.0)[:, None] / 2  # tapers, but stays a connected line
        spicules.append(np.concatenate([spine + half * normal, (spine - half * normal)[::-1]]))
    extent = max(float(np.abs(np.concatenate([core] + spicules)).max()) * 1.42, 4.0)
    return {"core": core, "spicules": spicules, "radius": radius, "edge": rng.uniform(0.4, 1.0) / mm, "extent": extent}


def _draw_mass(rng, shape: dict[str, Any], centre: np.ndarray, window: tuple[int, int], origin: np.ndarray):
    """(mask, density) of a mass in a local window whose top-left pixel edge is at ``origin``."""
    core_mask = _fill(window, [shape["core"] + centre - origin])
    soft = cv2.GaussianBlur(core_mask.astype(np.float32), (0, 0), shape["edge"])
    # A projected solid is thicker in the middle: a dome profile inside the soft outline.
    dist_in = cv2.distanceTransform(core_mask.astype(np.uint8), cv2.DIST_L2, 3)
    dome = np.sqrt(dist_in / max(float(dist_in.max()), 1.0))
    density = soft * (0.55 + 0.45 * dome) * (1.0 + 0.12 * power_law_noise(rng, window, 2.5))
    if not shape["spicules"]:
        return core_mask, density
    spic_mask = _fill(window, [p + centre - origin for p in shape["spicules"]])
    # Spicules fade with the distance from the core (fibrous strands thin out).
    yy, xx = np.mgrid[0:window[0], 0:window[1]].astype(np.float32)
    reach = np.hypot(xx + origin[0] + 0.5 - centre[0], yy + origin[1] + 0.5 - centre[1]) / (shape["radius"] * 3.4)
    fade = 0.6 * (1.0 - 0.7 * np.clip(reach, 0, 1))
    density = np.maximum(density, fade * cv2.GaussianBlur(spic_mask.astype(np.float32), (0, 0), 0.5))
    return core_mask | spic_mask, density


def _calc_shape(rng, mm: float, malignant: bool) -> dict[str, Any]:
    n = int(rng.integers(8, 21) if malignant else rng.integers(5, 11))
    spread = rng.uniform(2.0, 4.5) / mm
    specks = []
    for _ in range(n):
        pos = np.clip(rng.normal(0, spread, 2), -2 * spread, 2 * spread)
        size = rng.uniform(0.1, 0.55) / mm if malignant else rng.uniform(0.25, 0.45) / mm  # pleomorphic vs uniform
        elong = rng.uniform(1.0, 3.0) if malignant else rng.uniform(1.0, 1.3)
        axes = (max(size * elong / 2, 0.5), max(size / 2, 0.5))
        specks.append((pos, axes, rng.uniform(0, 180), rng.uniform(0.55, 1.0)))
    grow = max(2, int(round(0.5 / mm)))
    extent = max(float(np.abs(p).max()) + a[0] for p, a, _, _ in specks) + grow + 3
    return {"specks": specks, "grow": grow, "extent": extent, "mm": mm}


def _draw_calcifications(shape: dict[str, Any], centre: np.ndarray, window: tuple[int, int], origin: np.ndarray):
    """(mask = convex hull of the specks dilated by 0.5 mm, brightness) of a cluster in a local window."""
    specks = np.zeros(window, np.uint8)
    brightness = np.zeros(window, np.float32)
    for pos, axes, angle, level in shape["specks"]:
        one = np.zeros(window, np.uint8)
        cx, cy = (pos + centre - origin - 0.5) * 16
        cv2.ellipse(one, (int(round(cx)), int(round(cy))), (int(round(axes[0] * 16)), int(round(axes[1] * 16))), angle, 0, 360, 1, -1,
                    cv2.LINE_8, 4)
        specks |= one
        brightness = np.maximum(brightness, one * np.float32(level))
    hull = np.zeros(window, np.uint8)
    cv2.fillPoly(hull, [cv2.convexHull(np.argwhere(specks)[:, ::-1].astype(np.int32))], 1)
    g = shape["grow"]
    hull = cv2.dilate(hull, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * g + 1, 2 * g + 1)))
    sigma = min(0.6, 0.06 / shape["mm"])  # a little optical blur, none when pixels are coarser than the specks
    return hull.astype(bool), (cv2.GaussianBlur(brightness, (0, 0), sigma) if sigma >= 0.3 else brightness)


def _place(rng, allowed: np.ndarray, extent: float) -> tuple[float, float] | None:
    """A random centre (grid pixel edges) whose disc of radius ``extent`` lies in ``allowed``; None if none fits."""
    dist = cv2.distanceTransform(allowed.astype(np.uint8), cv2.DIST_L2, 5)
    ys, xs = np.nonzero(dist > extent)
    if ys.size == 0:
        return None
    i = int(rng.integers(ys.size))
    return float(xs[i]) + rng.uniform(0, 1), float(ys[i]) + rng.uniform(0, 1)


AMPLITUDES = {"calc": (0.2, 0.4), "circumscribed": (0.07, 0.18), "spiculated": (0.07, 0.18)}
MASS_WORDS = {  # CBIS-DDSM vocabulary for the CSVs
    "CIRCUMSCRIBED": dict(shapes=("OVAL", "ROUND", "LOBULATED"), assessment=(2, 3, 4)),
    "SPICULATED": dict(shapes=("IRREGULAR",), assessment=(4, 5)),
}
CALC_TYPES = {"benign": ("PUNCTATE", "ROUND_AND_REGULAR", "AMORPHOUS"), "malignant": ("PLEOMORPHIC", "FINE_LINEAR_BRANCHING")}


def _lesion_plan(rng, n_masses: int | None, n_calc_clusters: int | None) -> list[str]:
    if n_masses is None and n_calc_clusters is None:
        total = int(rng.choice([0, 1, 2, 3], p=[0.3, 0.4, 0.2, 0.1]))
        return [str(k) for k in rng.choice(["circumscribed", "spiculated", "calc"], size=total, p=[0.35, 0.3, 0.35])]
    masses = int(rng.integers(0, 3)) if n_masses is None else n_masses
    calcs = int(rng.integers(0, 2)) if n_calc_clusters is None else n_calc_clusters
    return [str(rng.choice(["circumscribed", "spiculated"])) for _ in range(masses)] + ["calc"] * calcs


def _lesion_words(rng, kind: str, pathology: str) -> tuple[str, str, dict[str, Any]]:
    """(kind, source_label, CBIS-DDSM attributes) of a planned lesion."""
    if kind == "calc":
        return "calcification", "CLUSTERED", {"calc_type": str(rng.choice(CALC_TYPES[pathology])), "calc_distribution": "CLUSTERED",
                                               "assessment": int(rng.choice([4, 5] if pathology == "malignant" else [2, 3, 4]))}
    label = kind.upper()
    return "mass", label, {"mass_shape": str(rng.choice(MASS_WORDS[label]["shapes"])), "mass_margins": label,
                           "assessment": int(rng.choice(MASS_WORDS[label]["assessment"]))}


def synthesize_mammogram(rng: np.random.Generator, size: tuple[int, int] = (1024, 832), laterality: str = "L", view: str = "MLO",
                         n_masses: int | None = None, n_calc_clusters: int | None = None) -> SyntheticMammogram:
    """One synthetic mammogram with exact lesion masks. Lesion counts are drawn (0-3) unless given;
    a lesion that finds no room (small image, crowded breast) is dropped rather than overlapped.

    Smooth anatomy is composed on a coarse grid and upsampled once; the breast edge, lesions and
    quantum noise are drawn at full resolution (a 4084x3328 image takes about a second).
    """
    if laterality not in ("L", "R") or view not in ("CC", "MLO"):
        raise ValueError(f"laterality must be L or R and view CC or MLO, got {laterality!r}, {view!r}")
    h, w = int(size[0]), int(size[1])
    if h < 64 or w < 64:
        raise ValueError(f"image size must be at least 64x64, got {h}x{w}")
    mm = DETECTOR_HEIGHT_MM / h  # pixel spacing in mm
    density = int(rng.choice([1, 2, 3, 4], p=[0.2, 0.35, 0.3, 0.15]))

    outline, nipple = _outline(rng, h, w, view)
    pect_poly = _pectoral_polygon(rng, h, outline) if view == "MLO" else None
    breast = _fill((h, w), [outline])
    pectoral = _fill((h, w), [pect_poly]) & breast if pect_poly is not None else np.zeros((h, w), bool)

    grid = _texture_grid((h, w))
    scale = np.array([grid[1] / w, grid[0] / h])
    mm_g = mm / float(scale.mean())  # mm per grid pixel
    breast_g = _fill(grid, [outline * scale])
    pect_g = _fill(grid, [pect_poly * scale]) & breast_g if pect_poly is not None else np.zeros(grid, bool)
    d_g = _skin_distance(breast_g) * mm_g
    x_mm = (np.arange(grid[1], dtype=np.float32) + 0.5) * mm_g
    glandular, strands, muscle_texture = _tissue(rng, grid, d_g, x_mm, tuple(np.array(nipple) * scale), density)

    # Compressed thickness: flat inside, a circular-profile fall-off over the last 7-18 mm.
    u = np.clip(d_g / rng.uniform(7, 18), 0, 1)
    thickness = np.sqrt(u * (2 - u)) * breast_g
    fat, gland = rng.uniform(0.3, 0.38), rng.uniform(0.36, 0.5)
    attenuation = thickness * (fat + gland * glandular + rng.uniform(0.05, 0.1) * strands)
    if view == "MLO":  # muscle: brighter towards the corner, a soft edge, its own faint texture
        soft = cv2.GaussianBlur(pect_g.astype(np.float32), (0, 0), max(0.7 / mm_g, 0.5)) * breast_g
        yy, xx = np.mgrid[0:grid[0], 0:grid[1]].astype(np.float32)
        reach = max(float(np.hypot(*np.nonzero(pect_g)).max()) if pect_g.any() else 1.0, 1.0)
        level = max(rng.uniform(0.5, 0.62), float(np.percentile(attenuation[breast_g], 90)) * rng.uniform(0.9, 1.0))
        muscle = level + 0.2 * (1.0 - np.clip(np.hypot(xx, yy) / reach, 0, 1)) + 0.05 * muscle_texture
        attenuation = attenuation * (1 - soft) + muscle * soft
    skin_mm = max(0.6, 1.2 * mm_g)
    attenuation += rng.uniform(0.05, 0.1) * np.exp(-((d_g / skin_mm) ** 2)) * breast_g  # the denser skin line
    # Grey dilation carries the edge values outwards so that upsampling does not darken the edge.
    attenuation = np.where(breast_g, attenuation, cv2.dilate(attenuation, np.ones((5, 5), np.uint8))).astype(np.float32)
    full = cv2.resize(attenuation, (w, h), interpolation=cv2.INTER_LINEAR)
    full *= breast

    lesions: list[SyntheticLesion] = []
    margin_g = int(np.ceil(3.0 / mm_g))
    blocked = cv2.dilate(pect_g.astype(np.uint8), np.ones((2 * margin_g + 1,) * 2, np.uint8)).astype(bool) | (d_g <= 8.0)
    blocked[[0, -1], :] = blocked[:, [0, -1]] = True
    taken = np.zeros((h, w), bool)
    for kind in _lesion_plan(rng, n_masses, n_calc_clusters):
        malignant = kind == "spiculated" or (kind == "calc" and bool(rng.random() < 0.5))
        pathology = "malignant" if malignant else "benign"
        shape = _calc_shape(rng, mm, malignant) if kind == "calc" else _mass_shape(rng, mm, kind == "spiculated")
        spot = _place(rng, breast_g & ~blocked, shape["extent"] * float(scale.max()) + 1)
        if spot is None:
            continue
        centre = np.array(spot) / scale
        r = int(np.ceil(shape["extent"])) + 4
        x0, y0 = max(0, int(centre[0]) - r), max(0, int(centre[1]) - r)
        x1, y1 = min(w, int(centre[0]) + r + 1), min(h, int(centre[1]) + r + 1)
        window, origin = (y1 - y0, x1 - x0), np.array([x0, y0], float)
        if kind == "calc":
            local, signal = _draw_calcifications(shape, centre, window, origin)
        else:
            local, signal = _draw_mass(rng, shape, centre, window, origin)
        sy, sx = slice(y0, y1), slice(x0, x1)
        if not local.any() or (local & ~breast[sy, sx]).any() or (local & (pectoral[sy, sx] | taken[sy, sx])).any():
            continue
        lo, hi = AMPLITUDES[kind]
        amp = rng.uniform(lo, hi)
        local_thickness = 1.0 if kind == "calc" else float(thickness[min(int(spot[1]), grid[0] - 1), min(int(spot[0]), grid[1] - 1)])
        full[sy, sx] += amp * local_thickness * signal
        mask = np.zeros((h, w), bool)
        mask[sy, sx] = local
        taken |= mask
        gx0, gy0 = (np.array([x0, y0]) * scale).astype(int) - margin_g
        gx1, gy1 = (np.array([x1, y1]) * scale).astype(int) + margin_g + 1
        blocked[max(gy0, 0):gy1, max(gx0, 0):gx1] = True  # keep the next lesion clear of this one
        lesion_kind, label, attributes = _lesion_words(rng, kind, pathology)
        attributes["subtlety"] = int(1 + round(4 * (amp - lo) / (hi - lo)))  # CBIS-DDSM: 1 subtle .. 5 obvious
        lesions.append(SyntheticLesion(mask, pathology, lesion_kind, label, attributes))

    # A gamma above 1 spreads the bright (dense) range and darkens fat, as film-like display curves do;
    # a 16k-entry table is 10x faster than pow on 13 Mpixel and finer than the 12-bit output.
    np.clip(full, 0.0, 1.0, out=full)
    image = GAMMA_TABLE[(full * (len(GAMMA_TABLE) - 1)).astype(np.int32)]
    noise_sd = cv2.sqrt(image)
    noise_sd *= 0.006
    noise_sd += 0.004
    noise_sd *= rng.standard_normal((h, w), dtype=np.float32)
    image += noise_sd
    np.clip(image, 0.0, 1.0, out=image)

    if laterality == "R":
        image, breast, pectoral = image[:, ::-1], breast[:, ::-1], pectoral[:, ::-1]
        for les in lesions:
            les.mask = np.ascontiguousarray(les.mask[:, ::-1])
    return SyntheticMammogram(image=np.ascontiguousarray(image, dtype=np.float32), breast_mask=np.ascontiguousarray(breast), lesions=lesions,
                              laterality=laterality, view=view, pectoral_mask=np.ascontiguousarray(pectoral), density=density,
                              pixel_spacing_mm=float(mm))


def write_synthetic_study(out: str | Path, **kwargs: Any) -> str:
    """Write a synthetic study (CBIS-DDSM and/or folder layout); see ``mammocad.synth_writers``."""
    from mammocad import synth_writers

    return synth_writers.write_synthetic_study(out, **kwargs)


def write_synthetic_dicom(path: str | Path, rng: np.random.Generator, **kwargs: Any) -> SyntheticMammogram:
    """Write one synthetic DICOM mammogram (benchmarks); see ``mammocad.synth_writers``."""
    from mammocad import synth_writers

    return synth_writers.write_synthetic_dicom(path, rng, **kwargs)
