"""The unified per-image figure: input | true mask | instances by shape class | Grad-CAM, plus a table.

Large slices are downsampled for display only (area averaging for the image
and heatmap, nearest neighbour for labels); every measurement comes from the
full-resolution arrays.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from .morphometry import SHAPE_CLASSES

CLASS_COLORS = {
    "round": "#1f77b4",
    "elongated": "#ff7f0e",
    "tubular": "#2ca02c",
    "fragmented": "#d62728",
    "irregular": "#9467bd",
}
DISPLAY_MAX = 1024


def _display(arr: np.ndarray, step: int, labels: bool = False) -> np.ndarray:
    if step == 1:
        return arr
    if labels:
        return arr[::step, ::step]
    import cv2

    h, w = arr.shape[:2]
    return cv2.resize(arr.astype(np.float32), (math.ceil(w / step), math.ceil(h / step)), interpolation=cv2.INTER_AREA)


def _class_rgba(instances: np.ndarray, classes: dict[int, str], fill_alpha: float = 0.45,
                colors: dict[str, str] | None = None) -> np.ndarray:
    """Each object filled with its shape-class colour (translucent) and outlined (opaque)."""
    from matplotlib.colors import to_rgba
    from skimage.segmentation import find_boundaries

    colors = CLASS_COLORS if colors is None else colors
    lut = np.zeros((int(instances.max()) + 1, 4), np.float32)
    for i, c in classes.items():
        if i < len(lut):
            lut[i] = to_rgba(colors.get(c, "white"))
    rgba = lut[instances]
    rgba[..., 3] *= fill_alpha
    edges = find_boundaries(instances, mode="inner")
    rgba[edges, 3] = lut[instances[edges], 3]
    return rgba


def unified_figure(image: np.ndarray, instances: np.ndarray, table: pd.DataFrame, heatmap: np.ndarray,
                   out: str | Path, title: str = "", true_mask: np.ndarray | None = None,
                   summary: dict | None = None, uncertainty: np.ndarray | None = None) -> Path:
    """Write the figure for one image.

    image: (H, W) raw slice; instances: (H, W) ids; table: the image's
    morphometry rows with `id` and `shape_class` (and `needs_review`: those
    objects get a dashed outline); heatmap: (H, W) in [0, 1]; true_mask:
    optional (H, W) ground truth; summary: the image's summary row;
    uncertainty: optional (H, W) in [0, 1], shown as its own panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    step = max(1, math.ceil(max(image.shape) / DISPLAY_MAX))
    img = _display(image.astype(np.float32), step)
    lo, hi = np.percentile(img, [1, 99.8])
    img = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
    inst = _display(instances, step, labels=True)
    classes = dict(zip(table["id"].astype(int), table["shape_class"])) if len(table) else {}

    review = (table["id"][table["needs_review"].astype(bool)].astype(int).tolist()
              if len(table) and "needs_review" in table else [])
    panels = (["input"] + (["true mask"] if true_mask is not None else [])
              + ["predicted, by shape class" + (" (dashed: review)" if review else ""), "Grad-CAM"]
              + (["uncertainty (entropy)"] if uncertainty is not None else []))
    n = len(panels)
    fig = plt.figure(figsize=(4.2 * n, 6.4))
    grid = fig.add_gridspec(2, n, height_ratios=[4.2, 1.6])
    axes = [fig.add_subplot(grid[0, i]) for i in range(n)]
    k = 0
    axes[k].imshow(img, cmap="gray", interpolation="nearest")
    if true_mask is not None:
        k += 1
        axes[k].imshow(_display(np.asarray(true_mask) > 0, step, labels=True), cmap="gray", interpolation="nearest")
    k += 1
    axes[k].imshow(img, cmap="gray", interpolation="nearest")
    axes[k].imshow(_class_rgba(inst, classes), interpolation="nearest")
    if review:
        axes[k].contour(np.isin(inst, review).astype(np.float32), levels=[0.5], colors="white",
                        linestyles="dashed", linewidths=1.2)
    k += 1
    axes[k].imshow(img, cmap="gray", interpolation="nearest")
    im = axes[k].imshow(_display(heatmap, step), cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
    fig.colorbar(im, ax=axes[k], fraction=0.046, pad=0.02)
    if uncertainty is not None:
        k += 1
        im = axes[k].imshow(_display(uncertainty, step), cmap="magma", vmin=0, vmax=1, interpolation="bilinear")
        fig.colorbar(im, ax=axes[k], fraction=0.046, pad=0.02)
    for ax, name in zip(axes, panels):
        ax.set_title(name, fontsize=11)
        ax.set_xticks([])
        ax.set_yticks([])

    counts = table["shape_class"].value_counts() if len(table) else pd.Series(dtype=int)
    handles = [Patch(color=CLASS_COLORS[c], label=f"{c} ({int(counts.get(c, 0))})") for c in SHAPE_CLASSES]
    legend_ax = fig.add_subplot(grid[1, 0])
    legend_ax.axis("off")
    legend_ax.legend(handles=handles, loc="center", title="shape class (count)", frameon=False, fontsize=10)
    text_ax = fig.add_subplot(grid[1, 1:])
    text_ax.axis("off")
    text_ax.text(0, 1, _table_text(table, summary or {}), family="monospace", fontsize=9.5, va="top")
    fig.suptitle(title, fontsize=13)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _table_text(table: pd.DataFrame, summary: dict) -> str:
    nm = "area_nm2" in table
    area_col, unit = ("area_nm2", "um^2") if nm else ("area_px2", "px^2")
    scale = 1e-6 if nm else 1.0
    lines = [f"mitochondria: {len(table)}"
             + (f"    pixel size: {summary['pixel_size_nm']:.2f} nm" if summary.get("pixel_size_nm") else "    pixel size unknown: units are pixels")]
    if len(table):
        a = table[area_col] * scale
        lines.append(f"area ({unit}): median {a.median():.4g}   mean {a.mean():.4g}   total {a.sum():.4g}")
        lines.append(f"aspect ratio: median {table['aspect_ratio'].median():.2f}   solidity: median "
                     f"{table['solidity'].median():.2f}   circularity: median {table['circularity'].median():.2f}")
    if summary.get("n_needs_review") is not None and "needs_review" in table:
        lines.append(f"needs review (confidence < 0.5, dashed): {summary['n_needs_review']} of {len(table)}")
    if summary.get("ood_warning"):
        lines.append(f"WARNING: unlike the training data (OOD score {summary['ood_score']:.2f} > "
                     f"{summary['ood_threshold']:.2f}); check the result, consider fine-tuning")
    if "gradcam_energy_in_mask" in summary:
        lines.append(f"Grad-CAM energy inside the predicted mask: {summary['gradcam_energy_in_mask']:.2f}")
    if "f1" in summary and summary.get("f1") == summary.get("f1"):
        lines.append(f"vs. true mask: F1 {summary['f1']:.3f}  IoU {summary['iou']:.3f}  precision {summary['precision']:.3f}  "
                     f"recall {summary['recall']:.3f}  instance F1@0.5 {summary['instance_f1_iou50']:.3f}  "
                     f"true count {summary['gt_count']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# Volumes

CLASS_COLORS_3D = {
    "globular": "#1f77b4",
    "elongated": "#ff7f0e",
    "tubular": "#2ca02c",
    "branched": "#9467bd",
    "fragmented": "#d62728",
}
MAX_RENDERED = 80  # surfaces drawn in the 3-D panel (the largest objects)


def volume_figure(image: np.ndarray, instances: np.ndarray, table: pd.DataFrame, out: str | Path,
                  voxel_size_nm=None, point: tuple[int, int, int] | None = None, title: str = "",
                  summary: dict | None = None) -> Path:
    """Orthogonal views (XY, XZ, YZ through `point`) with objects coloured by 3-D shape class,
    a 3-D rendering of the object surfaces, and a summary.

    image, instances: (Z, Y, X). table: `measure3d` rows with `id`, `shape_class`.
    voxel_size_nm: (z, y, x) nm; views keep the physical aspect ratio (voxels when None).
    point: (z, y, x) voxel; default: the centroid of the largest object, else the centre.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    from .morphometry3d import SHAPE_CLASSES_3D, object_mesh

    vz, vy, vx = voxel_size_nm or (1.0, 1.0, 1.0)
    classes = dict(zip(table["id"].astype(int), table["shape_class"])) if len(table) else {}
    if point is None:
        if len(table):
            big = table.loc[table["volume_vox"].idxmax()]
            point = tuple(int(round(big[f"centroid_{a}_vox"])) for a in "zyx")
        else:
            point = tuple(n // 2 for n in image.shape)
    z0, y0, x0 = (min(max(int(p), 0), n - 1) for p, n in zip(point, image.shape))
    lo, hi = np.percentile(image[z0], [1, 99.8])

    def gray(a):
        return np.clip((a.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0, 1)

    def rgba(ids):
        return _class_rgba(ids, classes, fill_alpha=0.45, colors=CLASS_COLORS_3D) if ids.any() else None

    # A shallow stack (25 slices of a 1024-px field) would show as a hairline:
    # depth is stretched to at least a quarter of the width, and the titles say so.
    depth, width = image.shape[0] * vz, max(image.shape[1] * vy, image.shape[2] * vx)
    zx = max(1.0, 0.25 * width / depth)
    note = f", z x{zx:.3g}" if zx > 1 else ""
    views = [("XY (z = %d)" % z0, image[z0], instances[z0], vy / vx),
             ("XZ (y = %d%s)" % (y0, note), image[:, y0, :], instances[:, y0, :], zx * vz / vx),
             ("YZ (x = %d%s)" % (x0, note), image[:, :, x0], instances[:, :, x0], zx * vz / vy)]
    fig = plt.figure(figsize=(16, 10))
    grid = fig.add_gridspec(2, 3, height_ratios=[1, 1.1])
    for k, (name, img, ids, aspect) in enumerate(views):
        ax = fig.add_subplot(grid[0, k])
        step = max(1, math.ceil(max(img.shape) / DISPLAY_MAX))
        shown = _display(gray(img), step)
        ax.imshow(shown, cmap="gray", interpolation="nearest", aspect=aspect)
        colours = rgba(_display(ids, step, labels=True))
        if colours is not None:
            ax.imshow(colours, interpolation="nearest", aspect=aspect)
        ax.set_title(name, fontsize=11)
        ax.set_xticks([])
        ax.set_yticks([])

    ax3 = fig.add_subplot(grid[1, :2], projection="3d")
    order = table.sort_values("volume_vox", ascending=False)["id"].astype(int).tolist()[:MAX_RENDERED] if len(table) else []
    from scipy import ndimage as ndi

    slices = ndi.find_objects(instances)
    for i in order:
        sl = slices[i - 1] if i - 1 < len(slices) else None
        if sl is None:
            continue
        crop = instances[sl] == i
        step = max(1, int(round(max(crop.shape) / 48)))  # coarse meshes: a picture, not a measurement
        verts, faces = object_mesh(crop, (vz, vy, vx), offset_vox=tuple(s.start for s in sl), step=step)
        if len(faces) == 0:
            continue
        xyz = verts[:, ::-1]  # (x, y, z) for display
        poly = Poly3DCollection(xyz[faces], facecolor=CLASS_COLORS_3D.get(classes.get(i), "gray"),
                                edgecolor="none", alpha=0.9, linewidth=0)
        ax3.add_collection3d(poly)
    ext = np.array(image.shape[::-1], float) * np.array([vx, vy, vz])
    ax3.set_xlim(0, ext[0])
    ax3.set_ylim(0, ext[1])
    ax3.set_zlim(0, ext[2])
    ax3.set_box_aspect(tuple(ext * [1, 1, zx] / (ext * [1, 1, zx]).max()))
    unit = "nm" if voxel_size_nm else "voxels"
    ax3.set_xlabel(f"x ({unit})")
    ax3.set_ylabel(f"y ({unit})")
    ax3.set_zlabel(f"z ({unit})")
    shown = f"{len(order)} largest of {len(table)}" if len(table) > len(order) else f"all {len(table)}"
    ax3.set_title(f"3-D surfaces ({shown} objects{note})", fontsize=11)

    text_ax = fig.add_subplot(grid[1, 2])
    text_ax.axis("off")
    counts = table["shape_class"].value_counts() if len(table) else pd.Series(dtype=int)
    handles = [Patch(color=CLASS_COLORS_3D[c], label=f"{c} ({int(counts.get(c, 0))})") for c in SHAPE_CLASSES_3D]
    text_ax.legend(handles=handles, loc="upper left", title="3-D shape class (count)", frameon=False, fontsize=10)
    text_ax.text(0, 0.55, _volume_text(summary or {}, voxel_size_nm), family="monospace", fontsize=9.5, va="top",
                 transform=text_ax.transAxes)
    fig.suptitle(title, fontsize=13)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _volume_text(summary: dict, voxel_size_nm) -> str:
    def num(key, fmt="{:.3g}"):
        v = summary.get(key)
        return "n/a" if v is None or v != v else fmt.format(v)

    lines = [f"mitochondria (3-D): {summary.get('count', 0)}",
             ("voxel: " + " x ".join(f"{v:g}" for v in voxel_size_nm) + " nm") if voxel_size_nm else
             "voxel size unknown: units are voxels",
             f"volume fraction: {num('volume_fraction')}",
             f"density: {num('density_per_um3')} per um^3"]
    for key in ("median_volume_nm3", "median_volume_vox", "median_sphericity", "median_elongation"):
        if key in summary:
            lines.append(f"{key.replace('_', ' ')}: {num(key)}")
    if "ap50" in summary:
        lines.append(f"vs. labels: F1 {num('f1')}  IoU {num('iou')}")
        lines.append(f"  instance F1@0.5 {num('instance_f1_iou50')}  AP50 {num('ap50')}  AP75 {num('ap75')}")
        lines.append(f"  true count {summary.get('gt_count')}  count error {summary.get('count_error')}")
    return "\n".join(lines)
