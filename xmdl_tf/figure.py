"""The unified per-image figure: input (with a scale bar) | true mask | instances by shape class |
Grad-CAM | uncertainty, plus a legend and a table.

Large slices are downsampled for display only (area averaging for the image
and heatmap, nearest neighbour for labels); every measurement comes from the
full-resolution arrays.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from .morphometry import SHAPE_CLASSES

CLASS_COLORS = {  # Okabe-Ito: told apart with any colour vision (protan-, deutan-, tritanopia)
    "round": "#0072B2",
    "elongated": "#E69F00",
    "tubular": "#009E73",
    "fragmented": "#D55E00",
    "irregular": "#CC79A7",
}
DISPLAY_MAX = 1024
FILL_ALPHA = 0.55
REVIEW_STYLE = ({"colors": "black", "linestyles": "solid", "linewidths": 2.4},   # halo: seen on light and dark
                {"colors": "white", "linestyles": "dashed", "linewidths": 1.3})


def _display(arr: np.ndarray, step: int, labels: bool = False) -> np.ndarray:
    if step == 1:
        return arr
    if labels:
        return arr[::step, ::step]
    import cv2

    h, w = arr.shape[:2]
    return cv2.resize(arr.astype(np.float32), (math.ceil(w / step), math.ceil(h / step)), interpolation=cv2.INTER_AREA)


def _class_rgba(instances: np.ndarray, classes: dict[int, str], fill_alpha: float = FILL_ALPHA,
                colors: dict[str, str] | None = None) -> np.ndarray:
    """Each object filled with its shape-class colour (translucent) and outlined (opaque)."""
    from matplotlib.colors import to_rgba
    from skimage.segmentation import find_boundaries

    colors = CLASS_COLORS if colors is None else colors
    ids, index = np.unique(instances, return_inverse=True)  # ids of any size (2**40) without a huge table
    lut = np.zeros((len(ids), 4), np.float32)
    for k, i in enumerate(ids.tolist()):
        if i and i in classes:
            lut[k] = to_rgba(colors.get(classes[i], "white"))
    rgba = lut[index.reshape(instances.shape)]
    rgba[..., 3] *= fill_alpha
    edges = find_boundaries(instances, mode="inner")
    rgba[edges, 3] = (rgba[edges, 3] > 0).astype(np.float32)
    return rgba


def scale_bar(width_px: int, pixel_size_nm: float | None, fraction: float = 0.2) -> tuple[float, str]:
    """A round scale bar for an image `width_px` pixels wide: (its length in pixels, its label).

    About `fraction` of the width, 1, 2 or 5 x 10^k nm (in um from 1 um), or pixels when the
    pixel size is unknown."""
    unit = float(pixel_size_nm) if pixel_size_nm else 1.0
    target = max(width_px * fraction * unit, unit if pixel_size_nm else 1.0)
    k = 10.0 ** math.floor(math.log10(target))
    length = max(round(m * k, 12) for m in (1, 2, 5) if m * k <= target * (1 + 1e-9))
    if not pixel_size_nm:
        label = f"{length:g} px"
    elif length >= 1000:
        label = f"{length / 1000:g} \u00b5m"
    else:
        label = f"{length:g} nm"
    return length / unit, label


def _layout(shape: tuple[int, int], panels: list[str], colorbars: list[bool], text: str) -> dict:
    """Where everything goes, in inches. The image panels keep the slice's aspect ratio: in one row for
    square to tall slices, in two or one columns for wide ones, so that no panel becomes a strip."""
    import textwrap

    h, w = shape
    r = w / max(h, 1)
    n = len(panels)
    if r <= 2:
        cols = n
        ih = 3.7 / r if r >= 1 else min(3.7 / r, 7.0)
    else:
        cols = 2 if r < 4 else 1
        ih = (8.0 if cols == 2 else 15.0) / r
    iw = ih * r
    rows = math.ceil(n / cols)
    cb = 0.6  # colour bar, its ticks and the gap before it
    col_w = [max(iw + (cb if any(colorbars[j::cols]) else 0.0), 2.3) for j in range(cols)]
    titles = ["\n".join(textwrap.wrap(p, int(col_w[k % cols] * 10))) for k, p in enumerate(panels)]
    gap, left, top = 0.25, 0.15, 0.5
    title_h = 0.15 + 0.2 * max(t.count("\n") + 1 for t in titles)
    lines = text.split("\n")
    bottom = max(1.95, 0.3 + 0.19 * len(lines))
    width = max(left + sum(col_w) + gap * (cols - 1) + 0.15, 2.8 + 0.08 * max(map(len, lines)))
    height = top + rows * (title_h + ih) + (rows - 1) * gap + 0.2 + bottom
    boxes = []
    for k in range(n):
        row, col = divmod(k, cols)
        spare = col_w[col] - iw - (cb if any(colorbars[col::cols]) else 0.0)  # a narrow image: centred
        x = left + sum(col_w[:col]) + gap * col + spare / 2
        y = height - top - title_h - row * (title_h + ih + gap) - ih
        boxes.append((x, y, iw, ih))
    return {"size": (width, height), "boxes": boxes, "bottom": bottom, "titles": titles}


def draw_unified(image: np.ndarray, instances: np.ndarray, table: pd.DataFrame, heatmap: np.ndarray,
                 title: str = "", true_mask: np.ndarray | None = None, summary: dict | None = None,
                 uncertainty: np.ndarray | None = None):
    """The figure `unified_figure` writes (arguments as there), not saved: (matplotlib Figure, info).

    info: "panels" (titles), "legend" (its labels), "scale_bar" (its length in the displayed
    image's pixels, its label, its length in the slice's pixels), "step" (display downsampling),
    "size" (inches).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    summary = summary or {}
    step = max(1, math.ceil(max(image.shape) / DISPLAY_MAX))
    img = _display(image.astype(np.float32), step)
    lo, hi = np.percentile(img, [1, 99.8])
    img = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
    inst = _display(instances, step, labels=True)
    classes = dict(zip(table["id"].astype(int), table["shape_class"])) if len(table) else {}

    review = (table["id"][table["needs_review"].astype(bool)].astype(int).tolist()
              if len(table) and "needs_review" in table else [])
    panels = (["input"] + (["true mask"] if true_mask is not None else [])
              + ["predicted, by shape class" + (" (dashed: needs review)" if review else ""), "Grad-CAM"]
              + (["uncertainty (entropy, bits)"] if uncertainty is not None else []))
    colorbars = [p.startswith(("Grad-CAM", "uncertainty")) for p in panels]
    text = _table_text(table, summary)
    geo = _layout(img.shape, panels, colorbars, text)
    fw, fh = geo["size"]
    fig = plt.figure(figsize=(fw, fh))
    try:  # a figure left open would leak in a long batch
        axes = [fig.add_axes((x / fw, y / fh, w / fw, h / fh)) for x, y, w, h in geo["boxes"]]
        iw = geo["boxes"][0][2]
        aa = "antialiased"  # panels are drawn smaller than DISPLAY_MAX: "nearest" would alias thin structures away
        k = 0
        axes[k].imshow(img, cmap="gray", vmin=0, vmax=1, interpolation=aa)
        length_px, bar_label = scale_bar(image.shape[1], summary.get("pixel_size_nm"))
        per_inch = img.shape[1] / iw  # displayed pixels per inch
        bar = AnchoredSizeBar(axes[k].transData, length_px / step, bar_label, "lower right", pad=0.3, sep=2,
                              color="white", frameon=True, size_vertical=0.04 * per_inch, fontproperties={"size": 9})
        bar.patch.set(facecolor="black", alpha=0.6, edgecolor="none")
        bar.set_gid("scale_bar")
        axes[k].add_artist(bar)
        if true_mask is not None:
            k += 1
            axes[k].imshow(_display(np.asarray(true_mask) > 0, step, labels=True), cmap="gray", vmin=0, vmax=1,
                           interpolation=aa)
        k += 1
        axes[k].imshow(img, cmap="gray", vmin=0, vmax=1, interpolation=aa)
        axes[k].imshow(_class_rgba(inst, classes), interpolation=aa)
        if review:
            flagged = np.isin(inst, review).astype(np.float32)
            for style in REVIEW_STYLE:
                axes[k].contour(flagged, levels=[0.5], **style)
        k += 1
        axes[k].imshow(img, cmap="gray", vmin=0, vmax=1, interpolation=aa)
        im = axes[k].imshow(_display(heatmap, step), cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
        fig.colorbar(im, cax=axes[k].inset_axes((1 + 0.06 / iw, 0, 0.13 / iw, 1)))
        if uncertainty is not None:
            k += 1
            im = axes[k].imshow(_display(uncertainty, step), cmap="magma", vmin=0, vmax=1, interpolation="bilinear")
            fig.colorbar(im, cax=axes[k].inset_axes((1 + 0.06 / iw, 0, 0.13 / iw, 1)))
        for ax, name in zip(axes, geo["titles"]):
            ax.set_title(name, fontsize=11)
            ax.set_xticks([])
            ax.set_yticks([])

        counts = table["shape_class"].value_counts() if len(table) else pd.Series(dtype=int)
        handles = [Patch(facecolor=CLASS_COLORS[c], label=f"{c} ({int(counts.get(c, 0))})") for c in SHAPE_CLASSES]
        labels = [h.get_label() for h in handles]
        if review or summary.get("n_needs_review") is not None:
            handles.append(tuple(Line2D([], [], color=s["colors"], linestyle=s["linestyles"], linewidth=s["linewidths"])
                                 for s in REVIEW_STYLE))
            labels.append(f"needs review ({len(review)})")
        bottom = geo["bottom"]
        legend_ax = fig.add_axes((0.1 / fw, 0.05 / fh, 2.4 / fw, (bottom - 0.1) / fh))
        legend_ax.axis("off")
        legend_ax.legend(handles, labels, loc="upper left", title="shape class (count)", frameon=False, fontsize=10,
                         alignment="left")
        text_ax = fig.add_axes((2.7 / fw, 0.05 / fh, 1 - 2.8 / fw, (bottom - 0.1) / fh))
        text_ax.axis("off")
        text_ax.text(0, 1, text, family="monospace", fontsize=9.5, va="top", transform=text_ax.transAxes)
        fig.suptitle(title, fontsize=13, y=1 - 0.1 / fh, va="top")
        info = {"panels": panels, "legend": labels, "scale_bar": (length_px / step, bar_label, length_px),
                "step": step, "size": (fw, fh)}
        return fig, info
    except BaseException:
        plt.close(fig)
        raise


def unified_figure(image: np.ndarray, instances: np.ndarray, table: pd.DataFrame, heatmap: np.ndarray,
                   out: str | Path, title: str = "", true_mask: np.ndarray | None = None,
                   summary: dict | None = None, uncertainty: np.ndarray | None = None) -> Path:
    """Write the figure for one image (PNG, 100 dpi; replaced atomically: `out` is whole or absent).

    image: (H, W) raw slice; instances: (H, W) ids; table: the image's
    morphometry rows with `id` and `shape_class` (and `needs_review`: those
    objects get a dashed outline); heatmap: (H, W) in [0, 1]; true_mask:
    optional (H, W) ground truth; summary: the image's summary row (its
    `pixel_size_nm` sets the scale bar); uncertainty: optional (H, W) in [0, 1],
    shown as its own panel.
    """
    import matplotlib.pyplot as plt

    out = Path(out)
    fig, _ = draw_unified(image, instances, table, heatmap, title, true_mask, summary, uncertainty)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, dpi=100, format=out.suffix.lstrip(".").lower() or "png")
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
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

CLASS_COLORS_3D = {  # Okabe-Ito, as CLASS_COLORS
    "globular": "#0072B2",
    "elongated": "#E69F00",
    "tubular": "#009E73",
    "branched": "#CC79A7",
    "fragmented": "#D55E00",
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
