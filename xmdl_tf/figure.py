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


def _display(arr: np.ndarray, step: int | tuple[int, int], labels: bool = False) -> np.ndarray:
    """`arr` downsampled by `step` (one for both axes, or (rows, columns))."""
    sr, sc = (step, step) if isinstance(step, int) else step
    if sr == sc == 1:
        return arr
    if labels:
        return arr[::sr, ::sc]
    import cv2

    h, w = arr.shape[:2]
    return cv2.resize(arr.astype(np.float32), (math.ceil(w / sc), math.ceil(h / sr)), interpolation=cv2.INTER_AREA)


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
    fig, _ = draw_unified(image, instances, table, heatmap, title, true_mask, summary, uncertainty)
    return _save(fig, out, 100)


def _save(fig, out: str | Path, dpi: int) -> Path:
    """Write `fig` to `out` atomically (a temporary file, then a rename) and close it, also on failure."""
    import matplotlib.pyplot as plt

    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, dpi=dpi, format=out.suffix.lstrip(".").lower() or "png")
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
    energy = summary.get("gradcam_energy_in_mask")
    if energy is not None and energy == energy:  # NaN: nothing predicted, no mask to hold the heat
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


def _volume_layout(extent: tuple[float, float, float], titles: list[str], text: str) -> dict:
    """Where everything goes, in inches, for the volume figure. `extent`: (x, y, depth) as drawn (depth
    already stretched), in any one unit. The views are laid out as orthogonal views at one scale: XY,
    YZ to its right (same height, z across), XZ below it (same width, z down); a one-slice stack
    (depth 0) has the XY view only. A wide block spans the figure with the 3-D panel, legend and text
    below it; otherwise they stand to its right."""
    import textwrap

    x, y, d = extent
    lines = text.split("\n")
    text_w = 0.08 * max(map(len, lines))
    bottom = max(1.7, 0.3 + 0.19 * len(lines))
    gap, left, top = 0.3, 0.3, 0.55
    wide, tall = (x + d) / (y + d) > 1.6, (y + d) / (x + d) > 1.6
    w_max, h_max = (15.2, 6.0) if wide else (8.5, 14.0) if tall else (8.5, 8.0)
    slot = 1.4  # the least width of a column: a narrow panel is centred in it, under a readable title

    def title_h(ts):
        return 0.15 + 0.2 * max(t.count("\n") + 1 for t in ts)

    # the wrapped titles depend on the scale and the scale on the titles' height: twice is enough
    s, wrapped = 0.0, titles
    for _ in range(2):
        th = title_h(wrapped)
        s = (min((w_max - gap) / (x + d), (h_max - th - 0.1) / (y + d)) if d else min(w_max / x, h_max / y))
        widths = [max(x * s, slot), max(d * s, slot), max(x * s, slot)]
        wrapped = ["\n".join(textwrap.wrap(t, max(int(w * 11), 14))) for t, w in zip(titles, widths)]
    th = title_h(wrapped)
    col1, col2 = max(x * s, slot), max(d * s, slot)
    block_w = col1 + (gap + col2 if d else 0.0)
    block_h = th + y * s + (th + 0.1 + d * s if d else 0.0)
    side_w = max(6.2, 2.6 + text_w)
    box3 = (6.2, 4.6) if not wide else (6.5, 4.6)
    if wide:
        width = max(left + block_w + 0.3, left + box3[0] + 0.5 + 2.6 + text_w)
        height = top + block_h + 0.35 + th + box3[1] + 0.3
    else:
        width = left + block_w + 0.6 + side_w + 0.2
        height = top + max(block_h, th + box3[1] + 0.3 + bottom) + 0.2
    y_top = height - top - th
    x1, x2 = left + (col1 - x * s) / 2, left + col1 + gap + (col2 - d * s) / 2
    boxes = {"XY": (x1, y_top - y * s, x * s, y * s)}
    if d:
        boxes["YZ"] = (x2, y_top - y * s, d * s, y * s)
        boxes["XZ"] = (x1, y_top - y * s - th - 0.1 - d * s, x * s, d * s)
    if wide:
        y3 = height - top - block_h - 0.35 - th - box3[1]
        boxes["3D"] = (left, y3, *box3)
        boxes["legend"] = (left + box3[0] + 0.5, y3, 2.5, box3[1])
        boxes["text"] = (left + box3[0] + 0.5 + 2.6, y3, text_w + 0.1, box3[1])
    else:
        x3 = left + block_w + 0.6
        boxes["3D"] = (x3, y_top - box3[1], *box3)
        boxes["legend"] = (x3, 0.1, 2.5, bottom)
        boxes["text"] = (x3 + 2.6, 0.1, text_w + 0.1, bottom)
    return {"size": (width, height), "boxes": boxes, "titles": wrapped, "scale": s}


def draw_volume(image: np.ndarray, instances: np.ndarray, table: pd.DataFrame, voxel_size_nm=None,
                point: tuple[int, int, int] | None = None, title: str = "", summary: dict | None = None):
    """The figure `volume_figure` writes (arguments as there), not saved: (matplotlib Figure, info).

    info: "panels" (titles), "legend" (its labels), "scale_bars" ({view: (length in the displayed
    image's pixels, label, length in voxels)}), "z_stretch" (how much z is drawn enlarged, 1: to
    scale), "point" (z, y, x), "axes" ({view: Axes}), "size" (inches).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator, NullFormatter
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    from .morphometry3d import SHAPE_CLASSES_3D, object_mesh

    known = bool(voxel_size_nm)
    summary = {"count": len(table), **(summary or {})}
    vz, vy, vx = (float(v) for v in voxel_size_nm) if known else (1.0, 1.0, 1.0)
    nz, ny, nx = image.shape
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

    # A shallow stack (25 slices of a 1024-px field) would show as a hairline: depth is drawn at
    # least a quarter of the smaller side (a twentieth of the larger), and the figure says so.
    X, Y, depth = nx * vx, ny * vy, nz * vz
    zx = max(1.0, max(0.25 * min(X, Y), 0.05 * max(X, Y)) / depth) if nz > 1 else 1.0
    stretch = f"stretched \u00d7{zx:.3g}" if zx > 1 else "to scale"
    # (title, grey image, ids, steps (rows, cols), voxel size along (rows, cols) in drawn units)
    in_plane = max(1, math.ceil(max(ny, nx) / DISPLAY_MAX))  # z is never downsampled
    views = {"XY": (f"XY at z = {z0}", image[z0], instances[z0], (in_plane, in_plane))}
    if nz > 1:
        views["YZ"] = (f"YZ at x = {x0} (z \u2192, {stretch})", image[:, :, x0].T, instances[:, :, x0].T,
                       (in_plane, 1))
        views["XZ"] = (f"XZ at y = {y0} (z \u2193, {stretch})", image[:, y0, :], instances[:, y0, :], (1, in_plane))
    text = _volume_text(summary, voxel_size_nm, (z0, y0, x0), zx, nz)
    order = (table.sort_values("volume_vox", ascending=False)["id"].astype(int).tolist()[:MAX_RENDERED]
             if len(table) and nz > 1 else [])
    shown = (f"the {len(order)} largest of {len(table)} objects" if len(table) > len(order) else
             f"all {len(table)} objects" if len(table) else "no objects")
    title3 = (f"3-D surfaces: {shown} (z {stretch})" if nz > 1 else "3-D surfaces: none for a one-slice stack")
    titles = [v[0] for v in views.values()]
    geo = _volume_layout((X, Y, depth * zx if nz > 1 else 0.0), titles + [""] * (3 - len(titles)), text)
    fw, fh = geo["size"]
    fig = plt.figure(figsize=(fw, fh))
    try:  # a figure left open would leak in a long batch
        def axes_at(box, **kw):
            x, y, w, h = box
            return fig.add_axes((x / fw, y / fh, w / fw, h / fh), **kw)

        aa = "antialiased"  # as in the 2-D figure: "nearest" would alias thin structures away
        marks = {"XY": ((x0, "YZ"), (y0, "XZ")), "YZ": ((z0, "XY"), (y0, "XZ")), "XZ": ((x0, "YZ"), (z0, "XY"))}
        bars, axes = {}, {}
        for (key, (_, img, ids, (sr, sc))), name in zip(views.items(), geo["titles"]):
            box = geo["boxes"][key]
            ax = axes[key] = axes_at(box)
            shown_img, ids = _display(gray(img), (sr, sc)), _display(ids, (sr, sc), labels=True)
            # A few slices drawn large are repeated, not interpolated: no blend of two sections
            # (the smoothing that keeps x and y from aliasing would otherwise smear across z).
            ratio = (box[3] / shown_img.shape[0]) / (box[2] / shown_img.shape[1])  # row height / column width
            rep_r, rep_c = (max(1, round(ratio)), 1) if key == "XZ" else (1, max(1, round(1 / ratio))) \
                if key == "YZ" else (1, 1)
            shown_img = np.repeat(np.repeat(shown_img, rep_r, 0), rep_c, 1)
            ids = np.repeat(np.repeat(ids, rep_r, 0), rep_c, 1)
            fr, fc = rep_r / sr, rep_c / sc  # displayed pixels per voxel along rows, columns
            ax.imshow(shown_img, cmap="gray", vmin=0, vmax=1, interpolation=aa, aspect="auto")
            if ids.any():
                ax.imshow(_class_rgba(ids, classes, fill_alpha=0.45, colors=CLASS_COLORS_3D), interpolation=aa,
                          aspect="auto")
            # the bar runs along the view's columns: x (XY, XZ) or z (YZ)
            along_z = key == "YZ"
            length, label = scale_bar(img.shape[1], (vz if along_z else vx) if known else None)
            if along_z:
                label = "z: " + (label if known else label.replace(" px", " slices"))
            rows_per_inch = shown_img.shape[0] / box[3]
            bar = AnchoredSizeBar(ax.transData, length * fc, label, "lower right", pad=0.3, sep=2, color="white",
                                  frameon=True, size_vertical=0.04 * rows_per_inch, fontproperties={"size": 9})
            bar.patch.set(facecolor="black", alpha=0.6, edgecolor="none")
            bar.set_gid("scale_bar")
            ax.add_artist(bar)
            bars[key] = (length * fc, label, length)
            ax.set_title(name, fontsize=11)
            (cx, _), (cy, _) = marks[key]  # where the other views cut: ticks on the frame, off the data
            ax.set_xticks([(cx + 0.5) * fc - 0.5] if nz > 1 else [])
            ax.set_yticks([(cy + 0.5) * fr - 0.5] if nz > 1 else [])
            ax.tick_params(length=7, width=1.5, color="#CC0000", direction="out", labelbottom=False,
                           labelleft=False, right=True)

        ax3 = axes_at(geo["boxes"]["3D"], projection="3d")
        # µm when the field is over 2 µm wide: tick labels such as 16000 would run into each other
        unit, div = ("voxels", 1.0) if not known else ("\u00b5m", 1000.0) if max(X, Y) >= 2000 else ("nm", 1.0)
        for i in order:
            row = table.loc[table["id"].astype(int) == i].iloc[0]
            if all(f"bbox_{a}0" in row for a in "zyx"):  # no id-long object list (ids can be 2**40)
                sl = tuple(slice(int(row[f"bbox_{a}0"]), int(row[f"bbox_{a}1"])) for a in "zyx")
            else:
                where = np.nonzero(instances == i)
                sl = tuple(slice(int(w.min()), int(w.max()) + 1) for w in where)
            crop = instances[sl] == i
            step = max(1, int(round(max(crop.shape) / 48)))  # coarse meshes: a picture, not a measurement
            verts, faces = object_mesh(crop, (vz, vy, vx), offset_vox=tuple(q.start for q in sl), step=step)
            if len(faces) == 0:
                continue
            xyz = verts[:, ::-1] / div  # (x, y, z) for display
            ax3.add_collection3d(Poly3DCollection(xyz[faces], facecolor=CLASS_COLORS_3D.get(classes.get(i), "gray"),
                                                  edgecolor="none", alpha=0.9, linewidth=0))
        ext = np.array([X, Y, depth]) / div
        ax3.set_xlim(0, ext[0])
        ax3.set_ylim(0, ext[1])
        ax3.set_zlim(0, ext[2])
        box = ext * [1, 1, zx]
        ax3.set_box_aspect(tuple(box / box.max()))
        for axis, name, frac in ((ax3.xaxis, "x", box[0]), (ax3.yaxis, "y", box[1]), (ax3.zaxis, "z", box[2])):
            axis.set_major_locator(MaxNLocator(4 if frac / box.max() > 0.3 else 2))
            if frac / box.max() < 0.12:  # a sliver of an axis: its tick labels would pile up on the next one's
                axis.set_major_formatter(NullFormatter())
            axis.set_label_text(f"{name} ({unit})")
        ax3.tick_params(labelsize=8)
        ax3.set_title(title3, fontsize=11, wrap=True)
        if nz == 1:
            ax3.set_axis_off()

        counts = table["shape_class"].value_counts() if len(table) else pd.Series(dtype=int)
        handles = [Patch(facecolor=CLASS_COLORS_3D[c], label=f"{c} ({int(counts.get(c, 0))})")
                   for c in SHAPE_CLASSES_3D]
        legend_ax = axes_at(geo["boxes"]["legend"])
        legend_ax.axis("off")
        legend_ax.legend(handles=handles, loc="upper left", title="3-D shape class (count)", frameon=False,
                         fontsize=10, alignment="left")
        text_ax = axes_at(geo["boxes"]["text"])
        text_ax.axis("off")
        text_ax.text(0, 1, text, family="monospace", fontsize=9.5, va="top", transform=text_ax.transAxes)
        fig.suptitle(title, fontsize=13, y=1 - 0.1 / fh, va="top")
        info = {"panels": [v[0] for v in views.values()] + [title3], "legend": [h.get_label() for h in handles],
                "scale_bars": bars, "z_stretch": zx, "point": (z0, y0, x0), "axes": axes, "size": (fw, fh)}
        return fig, info
    except BaseException:
        plt.close(fig)
        raise


def volume_figure(image: np.ndarray, instances: np.ndarray, table: pd.DataFrame, out: str | Path,
                  voxel_size_nm=None, point: tuple[int, int, int] | None = None, title: str = "",
                  summary: dict | None = None) -> Path:
    """Write the volume figure (PNG, 90 dpi; replaced atomically: `out` is whole or absent):
    orthogonal views (XY, YZ, XZ slices through `point`, at one scale, with scale bars) with objects
    coloured by 3-D shape class, a 3-D rendering of the object surfaces, a legend and a summary.

    image, instances: (Z, Y, X). table: `measure3d` rows with `id`, `shape_class`.
    voxel_size_nm: (z, y, x) nm; views keep the physical aspect ratio (voxels when None), a shallow
    stack's z drawn enlarged (said in the titles). point: (z, y, x) voxel; default: the centroid of
    the largest object, else the centre.
    """
    fig, _ = draw_volume(image, instances, table, voxel_size_nm, point, title, summary)
    return _save(fig, out, 90)


def _volume_text(summary: dict, voxel_size_nm, point=None, z_stretch: float = 1.0, slices: int = 2) -> str:
    def num(key, fmt="{:.3g}"):
        v = summary.get(key)
        return "n/a" if v is None or v != v else fmt.format(v)

    density = num("density_per_um3")
    lines = [f"mitochondria (3-D): {summary.get('count', 0)}",
             ("voxel: " + " x ".join(f"{v:g}" for v in voxel_size_nm) + " nm (z, y, x)") if voxel_size_nm else
             "voxel size unknown: units are voxels, drawn as cubes",
             f"volume fraction: {num('volume_fraction')}",
             f"density: {density}" + (" per um^3" if density != "n/a" else "")]
    for key in ("median_volume_nm3", "median_volume_vox", "median_sphericity", "median_elongation"):
        if key in summary:
            lines.append(f"{key.replace('_', ' ')}: {num(key)}")
    if "ap50" in summary:
        lines.append(f"vs. labels: F1 {num('f1')}  IoU {num('iou')}")
        lines.append(f"  instance F1@0.5 {num('instance_f1_iou50')}  AP50 {num('ap50')}  AP75 {num('ap75')}")
        lines.append(f"  true count {summary.get('gt_count')}  count error {summary.get('count_error')}")
    if point is not None:
        z, y, x = point
        if slices > 1:
            lines.append(f"views: slices through z = {z}, y = {y}, x = {x} (red ticks)")
            lines.append(f"z drawn \u00d7{z_stretch:.3g}" + (" its physical scale" if voxel_size_nm else "")
                         + " (shallow stack)" if z_stretch > 1 else
                         "z drawn to scale" + ("" if voxel_size_nm else " (as voxels)"))
        else:
            lines.append("one slice: no XZ, YZ or 3-D view")
    return "\n".join(lines)
