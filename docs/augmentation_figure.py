"""Draw `docs/augmentation.png`: every training augmentation, one at a time, on real EM tiles.

    python docs/augmentation_figure.py --data ../shared/data/drosophila_vnc_sstem ../shared/data/cdeep3m_sbem_mouse \
        ../shared/data/lucchipp_fibsem_mouse --out docs/augmentation.png

Row 1: one tile under each geometric transform (label outline in yellow).
Row 2: the same tile under each intensity transform at the largest strength
of its range. Row 3: random draws of the full "em" preset from each set.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--out", default="docs/augmentation.png")
    p.add_argument("--tile", type=int, default=256)
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    from xmdl_tf import augment as A
    from xmdl_tf.config import AugmentConfig
    from xmdl_tf.io import find_pairs
    from xmdl_tf.sampling import SliceRegion, load_region, sample_tiles

    t = args.tile
    slices = [load_region(SliceRegion(find_pairs(d, "val")[0])) for d in args.data]
    x, y = slices[0]
    c = (x.shape[0] / 2 - 0.5, x.shape[1] / 2 - 0.5)
    # Centre the geometry row on the labelled mitochondrion nearest the slice centre, so that
    # the largest zoom still shows one.
    from scipy import ndimage
    lab, n = ndimage.label(y > 0)
    if n:
        c = min(ndimage.center_of_mass(y > 0, lab, range(1, n + 1)), key=lambda q: (q[0] - c[0]) ** 2 + (q[1] - c[1]) ** 2)
    rng = np.random.default_rng(3)
    cfg = AugmentConfig()
    lo, hi = cfg.scale  # the ends of the preset's random zoom
    geo = [("original", A.warp_tile(x, y, c, t)),
           (f"zoom x{lo:g}", A.warp_tile(x, y, c, t, step=1 / lo)),
           (f"zoom x{hi:g}", A.warp_tile(x, y, c, t, step=1 / hi)),
           ("rotate 30 deg + mirror", A.warp_tile(x, y, c, t, angle=math.radians(30), mirror=True)),
           ("elastic (2 px)", A.warp_tile(x, y, c, t, displacement=A.elastic_field(rng, t, 2.0)))]
    base = geo[0][1][0]
    inten = [("defocus sigma 2", A.defocus(base, cfg.blur)),
             ("sharpen x1 (off in em)", A.sharpen(base, 1.0, 1.5)),
             ("random texture (off in em)", A.random_texture(base, np.random.default_rng(5), 1.0)),
             ("contrast x0.67 / x1.5", np.concatenate([A.contrast_brightness_gamma(base, math.exp(-cfg.contrast), 0, 1)[:, : t // 2],
                                                       A.contrast_brightness_gamma(base, math.exp(cfg.contrast), 0, 1)[:, t // 2:]], 1)),
             ("gamma 0.6 / 1.65", np.concatenate([A.contrast_brightness_gamma(base, 1, 0, math.exp(-cfg.gamma))[:, : t // 2],
                                                  A.contrast_brightness_gamma(base, 1, 0, math.exp(cfg.gamma))[:, t // 2:]], 1)),
             ("Poisson, 10 counts", A.poisson_noise(base, rng, 10.0)),
             ("Gaussian noise 0.04", np.clip(A.gaussian_noise(base, rng, cfg.noise), 0, 1)),
             ("stripes", A.stripes(base, rng, 0.06)),
             ("illumination 25%", A.illumination(base, rng, cfg.illumination))]
    draws = []
    for d, (sx, sy) in zip(args.data, slices):
        xs, ys = sample_tiles(sx, sy, np.random.default_rng(7), 2, t, 1.0, 0.5, cfg)
        draws += [(f"{Path(d).name[:18]}: em preset", (xs[i], ys[i])) for i in range(2)]
    ncol = max(len(geo), len(inten), len(draws))
    fig, axes = plt.subplots(3, ncol, figsize=(2.3 * ncol, 7.4))
    for ax in axes.ravel():
        ax.axis("off")
    for j, (name, (img, tgt)) in enumerate(geo):
        axes[0, j].imshow(img, cmap="gray", vmin=0, vmax=1)
        axes[0, j].contour(find_boundaries(tgt > 0.5), levels=[0.5], colors="yellow", linewidths=0.6)
        axes[0, j].set_title(name, fontsize=8)
    for j, (name, img) in enumerate(inten):
        axes[1, j].imshow(img, cmap="gray", vmin=0, vmax=1)
        axes[1, j].set_title(name, fontsize=8)
    for j, (name, (img, tgt)) in enumerate(draws):
        axes[2, j].imshow(img, cmap="gray", vmin=0, vmax=1)
        axes[2, j].contour(find_boundaries(tgt > 0.5), levels=[0.5], colors="yellow", linewidths=0.6)
        axes[2, j].set_title(name, fontsize=7)
    fig.suptitle("Training augmentation (xmdl_tf.augment): geometry / intensity at full range / random draws", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
