"""EM-realistic training augmentation in NumPy/OpenCV, shared by every backend.

One implementation serves the `tf.data` pipeline (through `tf.numpy_function`)
and the backend-neutral `keras.utils.PyDataset` path, so both see exactly the
same tiles for the same seed.

Geometry is a single resampling per tile from the *whole slice*: the output
tile's pixel grid is mirrored, rotated, scaled (pixel-size correction times a
random zoom) and elastically displaced, then mapped into the slice and sampled
(bilinear for the image, nearest neighbour for the target). Sampling from the
slice rather than from a pre-cut crop means rotated and zoomed-out tiles see
real neighbouring tissue, not padding.

Intensity transforms act on the normalised image in [0, 1] and mimic what
differs between microscopes: defocus (or a crisper image), texture, contrast and gamma of the detector,
shot (Poisson) and read (Gaussian) noise, section and scan stripes, uneven
illumination. Each is a separate function so it can be shown and ablated
(`docs/augmentation.png`, `benchmarks/loso.py --augment-off`).

Arrays: images float32 (H, W) in [0, 1]; targets float32 (H, W) with 1
mitochondrion, 0 background, -1 ignored.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from .config import AugmentConfig

IGNORE = -1.0


# ----------------------------------------------------------------------------
# Geometry


def elastic_field(rng: np.random.Generator, tile: int, amplitude: float, grid: int = 3) -> np.ndarray:
    """Smooth random displacement (2, tile, tile) float32 in output pixels, typical size `amplitude`.

    Control points on a (grid+1)^2 lattice are drawn from N(0, amplitude) and
    interpolated bicubically: deformations a few pixels large over distances of
    about tile/grid, the scale of section compression and warping in EM. Local
    strain stays below about 20% at amplitude 2 on 256-px tiles (measured: a
    finer lattice or larger amplitude smears texture into streaks).
    """
    coarse = rng.normal(0.0, amplitude, (2, grid + 1, grid + 1)).astype(np.float32)
    return np.stack([cv2.resize(c, (tile, tile), interpolation=cv2.INTER_CUBIC) for c in coarse])


def footprint_half_extent(tile: int, step: float, angle: float, elastic: float = 0.0) -> float:
    """Half the side of the axis-aligned square (slice pixels) a warped tile can touch."""
    return step * (tile / 2 + 3 * elastic) * (abs(math.cos(angle)) + abs(math.sin(angle))) + 2


def warp_tile(image: np.ndarray, target: np.ndarray, centre: tuple[float, float], tile: int, step: float = 1.0,
              angle: float = 0.0, mirror: bool = False,
              displacement: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Resample one (tile, tile) tile from a slice.

    image, target: (H, W) float32 slice. centre: (row, col) in slice pixels of
    the tile's centre. step: slice pixels per tile pixel (1 / (pixel-size factor
    x zoom)). angle: rotation in radians; mirror: flip the tile's columns first.
    displacement: optional (2, tile, tile) elastic field in tile pixels.
    With step 1, angle a multiple of pi/2 and no displacement the result is an
    exact crop (every sample falls on a pixel centre).
    Returns (image tile, target tile): pixels mapped outside the slice get a
    mirrored image and an ignored (-1) target.
    """
    h, w = image.shape
    half_ext = footprint_half_extent(tile, step, angle, 0.0 if displacement is None else
                                     float(np.abs(displacement).max()) / 3)
    # Work on the window the tile can touch: cheaper remaps, and a blur before a
    # zoom-out only costs that window.
    r0, c0 = max(0, int(math.floor(centre[0] - half_ext))), max(0, int(math.floor(centre[1] - half_ext)))
    r1, c1 = min(h, int(math.ceil(centre[0] + half_ext)) + 1), min(w, int(math.ceil(centre[1] + half_ext)) + 1)
    img, tgt = image[r0:r1, c0:c1], target[r0:r1, c0:c1]
    if step > 1.05:
        # Zooming out: low-pass first (as cv2.INTER_AREA does at inference), so
        # fine texture does not alias into patterns the slice does not have.
        img = cv2.GaussianBlur(img, (0, 0), (step - 1.0) / 2)  # skimage's rule; tested against INTER_AREA
    u = np.arange(tile, dtype=np.float32) - (tile - 1) / 2.0
    vv, uu = np.meshgrid(u, u)  # uu: tile rows, vv: tile columns, centred
    if mirror:
        vv = -vv
    if displacement is not None:
        uu = uu + displacement[0]
        vv = vv + displacement[1]
    ca, sa = math.cos(angle), math.sin(angle)
    if abs(ca) < 1e-12:
        ca = 0.0
    if abs(sa) < 1e-12:
        sa = 0.0
    rows = (centre[0] - r0) + step * (ca * uu - sa * vv)
    cols = (centre[1] - c0) + step * (sa * uu + ca * vv)
    rows, cols = rows.astype(np.float32), cols.astype(np.float32)
    out_img = cv2.remap(img, cols, rows, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    # Nearest neighbour keeps labels binary; pixels from outside the slice are ignored.
    out_tgt = cv2.remap(tgt, np.round(cols), np.round(rows), cv2.INTER_NEAREST,
                        borderMode=cv2.BORDER_CONSTANT, borderValue=IGNORE)
    # The window holds the whole footprint except where the slice ends, so
    # anything sampled beyond the window is beyond the slice.
    outside = (rows < -0.5) | (rows > img.shape[0] - 0.5) | (cols < -0.5) | (cols > img.shape[1] - 0.5)
    out_tgt[outside] = IGNORE
    return out_img, out_tgt


def draw_geometry(rng: np.random.Generator, cfg: AugmentConfig | None) -> tuple[float, float, bool]:
    """(zoom, angle in radians, mirror) for one tile; identity when cfg is None."""
    if cfg is None:
        return 1.0, 0.0, False
    lo, hi = cfg.scale
    zoom = float(math.exp(rng.uniform(math.log(lo), math.log(hi)))) if hi > lo else float(lo)
    if cfg.rotate == "any":
        angle = float(rng.uniform(0.0, 2 * math.pi))
    elif cfg.rotate == "90":
        angle = float(rng.integers(0, 4)) * math.pi / 2
    else:
        raise ValueError(f"augment.rotate must be 'any' or '90', got {cfg.rotate!r}")
    return zoom, angle, bool(rng.integers(0, 2))


# ----------------------------------------------------------------------------
# Intensity (image only, [0, 1] in and out)


def defocus(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with `sigma` pixels: a less sharp microscope or focus."""
    return cv2.GaussianBlur(x, (0, 0), sigma) if sigma > 0.05 else x


def sharpen(x: np.ndarray, amount: float, sigma: float) -> np.ndarray:
    """Unsharp mask x + amount (x - blur_sigma(x)), clipped to [0, 1]: a crisper microscope
    (sharper membranes and grain than the training data has)."""
    return np.clip(x + amount * (x - cv2.GaussianBlur(x, (0, 0), sigma)), 0.0, 1.0)


def random_texture(x: np.ndarray, rng: np.random.Generator, mix: float, layers: int = 4,
                   width: int = 2) -> np.ndarray:
    """Mix in the tile as seen by a random shallow convolutional network: a new grain,
    edge profile and fine texture of the same tissue (GIN, Ouyang et al. 2022).

    `layers` convolutions of 1 x 1 or 3 x 3 (drawn per layer; weights N(0, 1), no bias,
    `width` channels, leaky ReLU 0.2 between) make the new image; it is given the
    tile's mean, standard deviation and polarity (stained membranes stay dark: EM
    contrast does not invert between microscopes, so the network need not learn
    both) and mixed in at weight `mix` in [0, 1]. float32 (H, W) in [0, 1] out.
    """
    mean, spread = float(x.mean()), float(x.std())
    if spread < 1e-6:
        return x
    channels = [x.astype(np.float32, copy=False)]
    for layer in range(layers):
        k = int(rng.choice((1, 3)))
        n_out = 1 if layer == layers - 1 else width
        weights = rng.normal(0.0, 1.0, (n_out, len(channels), k, k)).astype(np.float32)
        out = []
        for o in range(n_out):
            acc = np.zeros_like(channels[0])
            for i, c in enumerate(channels):
                acc += cv2.filter2D(c, -1, weights[o, i], borderType=cv2.BORDER_REFLECT_101)
            out.append(acc if layer == layers - 1 else np.where(acc > 0, acc, 0.2 * acc))
        channels = out
    g = channels[0]
    g = (g - g.mean()) / max(float(g.std()), 1e-6)
    if float(np.mean(g * (x - mean))) < 0:  # keep the tile's polarity
        g = -g
    return np.clip((1.0 - mix) * x + mix * (mean + spread * g), 0.0, 1.0).astype(np.float32)


def contrast_brightness_gamma(x: np.ndarray, contrast: float, brightness: float, gamma: float) -> np.ndarray:
    """Scale contrast about the mean, shift, clip to [0, 1], then apply gamma (>0)."""
    m = float(x.mean())
    y = np.clip((x - m) * contrast + m + brightness, 0.0, 1.0)
    return np.power(y, gamma, dtype=np.float32)


def illumination(x: np.ndarray, rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """Multiply by a smooth random field 1 + a*f (|f| <= 1): uneven beam or detector response."""
    coarse = rng.uniform(-1.0, 1.0, (3, 3)).astype(np.float32)
    field = cv2.resize(coarse, x.shape[::-1], interpolation=cv2.INTER_CUBIC)
    field /= max(float(np.abs(field).max()), 1e-6)
    return np.clip(x * (1.0 + amplitude * field), 0.0, 1.0)


def stripes(x: np.ndarray, rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """Add offsets constant along rows (or columns): knife chatter, section
    thickness and scan-line artefacts. Mix of a periodic band pattern (period
    4-64 px) and independent per-line jitter."""
    axis = int(rng.integers(0, 2))
    n = x.shape[axis]
    t = np.arange(n, dtype=np.float32)
    period = float(math.exp(rng.uniform(math.log(4), math.log(64))))
    wave = np.sin(2 * math.pi * t / period + rng.uniform(0, 2 * math.pi)).astype(np.float32)
    jitter = rng.normal(0.0, 0.5, n).astype(np.float32)
    offsets = amplitude * (rng.uniform(0.3, 1.0) * wave + jitter) / 1.5
    return np.clip(x + (offsets[:, None] if axis == 0 else offsets[None, :]), 0.0, 1.0)


def poisson_noise(x: np.ndarray, rng: np.random.Generator, dose: float) -> np.ndarray:
    """Shot noise: counts ~ Poisson(x * dose), rescaled by dose (low dose = noisy)."""
    return (rng.poisson(x * dose) / dose).astype(np.float32)


def gaussian_noise(x: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    return x + rng.normal(0.0, sigma, x.shape).astype(np.float32)


def augment_intensity(x: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """All intensity transforms in a fixed order with random strengths; float32 [0, 1] out.

    Order follows image formation: illumination, then optics (defocus or sharpening,
    then a random texture), then the
    detector response (contrast, gamma), then artefacts and noise.
    """
    s = cfg.strength
    r = rng.uniform(-1.0, 1.0, 8)
    if cfg.illumination > 0 and r[0] > 0:
        x = illumination(x, rng, min(cfg.illumination * s * r[0], 0.9))
    if cfg.blur > 0 and r[1] > 0:  # half the tiles, sigma uniform in (0, blur * strength]
        x = defocus(x, cfg.blur * s * r[1])
    elif cfg.sharpen > 0 and r[1] < 0:  # the other half; an extra draw only then, so sharpen=0 changes nothing
        x = sharpen(x, cfg.sharpen * s * -r[1], float(rng.uniform(1.0, 2.0)))
    # Extra draws only when on, so texture=0 leaves every other part's draws as they were.
    if cfg.texture > 0 and rng.uniform() < min(cfg.texture * s, 1.0):
        x = random_texture(x, rng, float(rng.uniform(0.0, 1.0)))
    x = contrast_brightness_gamma(x, math.exp(cfg.contrast * s * r[2]), cfg.brightness * s * r[3],
                                  math.exp(cfg.gamma * s * r[4]))
    if cfg.stripes > 0 and (r[5] + 1) / 2 < min(cfg.stripes * s, 1.0):
        x = stripes(x, rng, 0.06 * s * float(rng.uniform(0.2, 1.0)))
    if cfg.poisson > 0 and (r[6] + 1) / 2 < min(cfg.poisson * s, 1.0):
        x = poisson_noise(x, rng, float(math.exp(rng.uniform(math.log(10.0), math.log(300.0)))) / s)
    if cfg.noise > 0:
        x = gaussian_noise(x, rng, cfg.noise * s * (r[7] + 1) / 2)
    return np.clip(x, 0.0, 1.0).astype(np.float32, copy=False)
