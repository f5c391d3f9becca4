"""napari sample data: the shipped EM slice and its expert mitochondria mask.

Section 15 of the Drosophila VNC ssTEM set (Gerhard et al. 2013, CC BY-NC-SA
3.0; see `xmdl_tf/sample/ATTRIBUTION.md`), 1024 x 1024 px at 4.6 nm.
"""
from __future__ import annotations

from pathlib import Path

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample"
SAMPLE_IMAGE = SAMPLE_DIR / "x" / "im0015.png"
SAMPLE_LABEL = SAMPLE_DIR / "y" / "seg0015.tif"
SAMPLE_PIXEL_SIZE_NM = 4.6  # ATTRIBUTION.md; the PNG carries no pixel size


def sample_slice() -> list[tuple]:
    """[(image uint8 (1024, 1024), kwargs, "image"), (mask uint8 0/1, kwargs, "labels")], scaled in nm."""
    from ..io import read_image, read_label

    px = SAMPLE_PIXEL_SIZE_NM
    common = {"scale": (px, px), "units": ("nm", "nm"),
              "metadata": {"source": str(SAMPLE_IMAGE), "pixel_size_nm": px, "voxel_size_nm": None}}
    image = read_image(SAMPLE_IMAGE)
    label = read_label(SAMPLE_LABEL)
    return [(image, {**common, "name": "im0015", "colormap": "gray"}, "image"),
            (label, {**common, "name": "im0015 expert mask", "opacity": 0.4, "visible": False}, "labels")]
