"""Make the README picture: a synthetic slice next to a real EM slice.

    python -m data_prep.compare_figure --real ../shared/data/drosophila_vnc_sstem/train/x/im0000.png \\
        --out docs/synthetic_vs_real.png

The synthetic slice is drawn at the real slice's pixel size (default 4.6 nm,
the Drosophila VNC ssTEM set) and size, so structures compare at scale.
Real data: Gerhard, Funke, Cardona et al. (2013), "Segmented anisotropic
ssTEM dataset of neural tissue", CC BY-NC-SA 3.0.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from xmdl_tf.cli import add_debug, guarded, pixel_size, positive_int

ATTRIBUTION = ("Right: real ssTEM, Drosophila larva VNC (Gerhard, Funke, Cardona et al. 2013, "
               "CC BY-NC-SA 3.0)")


def make_figure(real: str | Path, out: str | Path, *, seed: int = 0, pixel_size_nm: float = 4.6,
                crop: int = 512, overwrite: bool = False) -> Path:
    """Write a three-panel PNG: a synthetic slice, the same with its instance
    outlines, and ``real``; each a centred ``crop`` px square at the same scale.

    ``out`` must end in .png; an existing file is replaced only with ``overwrite``.
    """
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"{out}: the figure is a PNG; give --out a name ending in .png")
    if out.exists() and (out.is_dir() or not overwrite):
        raise FileExistsError(f"{out}: exists; choose another --out" + ("" if out.is_dir() else " or pass --overwrite"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from skimage.segmentation import find_boundaries

    from data_prep._common import read_image_file
    from data_prep.synthetic import generate_slice

    real_img = read_image_file(Path(real))
    size = min(real_img.shape)
    if crop > size:
        raise ValueError(f"{real}: {real_img.shape[1]} x {real_img.shape[0]} px is smaller than --crop {crop}; "
                         f"give a --crop of at most {size}")
    image, instances, objects = generate_slice(size=size, seed=seed, pixel_size_nm=pixel_size_nm)
    y0 = (real_img.shape[0] - crop) // 2
    x0 = (real_img.shape[1] - crop) // 2
    real_crop = real_img[y0:y0 + crop, x0:x0 + crop]
    s0 = (size - crop) // 2
    syn, ids = image[s0:s0 + crop, s0:s0 + crop], instances[s0:s0 + crop, s0:s0 + crop]
    overlay = np.stack([syn] * 3, axis=-1).astype(np.float32) / 255
    edge = find_boundaries(ids, mode="inner")
    overlay[edge] = (1.0, 0.2, 0.1)

    fig, axes = plt.subplots(1, 3, figsize=(15, 5.4), dpi=100)
    titles = (f"synthetic (seed {seed}, {pixel_size_nm} nm/px)", "synthetic: known instances", "real ssTEM")
    for ax, img, title in zip(axes, (syn, overlay, real_crop), titles):
        ax.imshow(img, cmap="gray", vmin=0, vmax=255 if img.ndim == 2 else None)
        ax.set_title(title, fontsize=12)
        ax.axis("off")
    bar_px = 500 / pixel_size_nm  # 500 nm scale bar
    for ax in axes:
        ax.plot([20, 20 + bar_px], [crop - 20, crop - 20], color="white", lw=4)
        ax.text(20 + bar_px / 2, crop - 30, "500 nm", color="white", ha="center", fontsize=10)
    fig.text(0.5, 0.02, ATTRIBUTION, ha="center", fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.partial.png")
    try:
        fig.savefig(tmp)
        os.replace(tmp, out)  # never half a figure under the real name
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out


@guarded
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data_prep.compare_figure", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", required=True, type=Path, help="a real EM slice (8-bit PNG/TIFF)")
    parser.add_argument("--out", required=True, type=Path, help="PNG to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pixel-size", type=pixel_size, default=4.6, metavar="NM",
                        help="pixel size of the real slice, used for the synthetic one (default 4.6)")
    parser.add_argument("--crop", type=positive_int, default=512, help="side of the shown square, px (default 512)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_debug(parser)
    args = parser.parse_args(argv)
    print(make_figure(args.real, args.out, seed=args.seed, pixel_size_nm=args.pixel_size, crop=args.crop,
                      overwrite=args.overwrite))


if __name__ == "__main__":
    sys.exit(main())
