"""Pictures of the napari plugin for the README: `python docs/napari_screenshot.py`.

Opens the shipped sample slice in napari, runs the "Segment mitochondria"
widget with the built-in model (`xmdl_ref`) and saves the whole window
(`viewer.screenshot(canvas_only=False)`) as docs/napari.png. With
`--finetune` it also saves the correct-then-fine-tune sequence
docs/napari_finetune.jpg: three views of the canvas side by side, the
segmentation, a correction painted from the expert mask in one box, and the
result after fine-tuning on it (the full windows go to --frames).

Needs the `napari` extra and an OpenGL context; headless:
`xvfb-run -a python docs/napari_screenshot.py [--finetune]`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def wait(job, timeout: float = 1800.0) -> None:
    """Process Qt events until the widget's background job has finished."""
    from qtpy.QtWidgets import QApplication

    t0 = time.time()
    while job.running:
        QApplication.processEvents()
        time.sleep(0.05)
        if time.time() - t0 > timeout:
            raise TimeoutError("the job did not finish")
    QApplication.processEvents()


def snap(viewer, path: Path) -> None:
    from qtpy.QtWidgets import QApplication

    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()  # e.g. napari's PyQt5 deprecation notice over the canvas
    for _ in range(5):
        QApplication.processEvents()
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    from PIL import Image

    # A 192-colour palette keeps the screenshot under a third of its size in the repo.
    Image.open(path).convert("RGB").quantize(colors=192, dither=Image.Dither.NONE).save(path, optimize=True)
    print(f"wrote {path}")


def strip(frames: list[Path], dest: Path, titles: list[str], box: tuple[int, int, int, int] = (400, 60, 1100, 820),
          width: int = 1200) -> None:
    """The canvases of full-window screenshots side by side with a title each (one small PNG for the README)."""
    from PIL import Image, ImageDraw

    crops = [Image.open(f).convert("RGB").crop(box) for f in frames]
    w, h = crops[0].size
    sheet = Image.new("RGB", (w * len(crops), h + 40), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (c, t) in enumerate(zip(crops, titles)):
        sheet.paste(c, (i * w, 40))
        draw.text((i * w + 10, 12), t, fill="black")
    sheet = sheet.resize((width, round(sheet.height * width / sheet.width)), Image.LANCZOS)
    sheet.save(dest, quality=85, optimize=True)  # a photo-like screenshot: JPEG is a third of the PNG
    print(f"wrote {dest}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="xmdl_ref")
    p.add_argument("--out", default=str(HERE), help="folder for the PNGs")
    p.add_argument("--finetune", action="store_true", help="also the correct-then-fine-tune sequence")
    p.add_argument("--epochs", type=int, default=6, help="fine-tuning epochs (10 steps each)")
    p.add_argument("--frames", default="runs/napari_docs_frames", help="folder for the full-window frames")
    p.add_argument("--box", type=int, default=384, help="side of the corrected box, px")
    args = p.parse_args(argv)
    # A real (X or Xvfb) window: Qt's offscreen platform grabs the OpenGL canvas only once.
    os.environ.setdefault("QT_QPA_PLATFORM", "xcb" if os.environ.get("DISPLAY") else "offscreen")

    import napari
    import numpy as np

    from xmdl_tf.napari._sample import sample_slice
    from xmdl_tf.napari._widgets import FinetuneWidget, SegmentWidget, camera, object_table

    out = Path(args.out)
    viewer = napari.Viewer(show=bool(os.environ.get("DISPLAY")))
    viewer.window._qt_window.resize(1700, 1000)
    # Draw once before TensorFlow is imported, as a shown window does: Mesa's libLLVM is then mapped
    # and `layers.import_tensorflow` loads TensorFlow apart from it (see there).
    viewer.screenshot(canvas_only=True)
    for data, kw, kind in sample_slice():
        getattr(viewer, f"add_{kind}")(data, **kw)
    seg_widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(seg_widget, name="Segment mitochondria", area="right")
    seg_widget.layer_box.setCurrentText("im0015")
    seg_widget.model.setText(args.model)
    seg_widget._prefill_from_model()
    seg_widget.run()
    wait(seg_widget.job)
    table = object_table(viewer)
    seg = seg_widget.last
    # Select the largest object: its row is highlighted and the view centred on it.
    table.select_object(int(seg.table.loc[seg.table["area_px2"].idxmax(), "id"]))
    viewer.reset_view()
    # Give the table most of the right-hand column (the segment form needs about 360 px).
    qt = viewer.window._qt_window
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QDockWidget

    docks = {d.windowTitle(): d for d in qt.findChildren(QDockWidget)}
    pair = [docks[k] for k in docks if "Segment" in k] + [docks[k] for k in docks if "Mitochondria" in k]
    if len(pair) == 2:
        qt.resizeDocks(pair, [360, 600], Qt.Vertical)
    snap(viewer, out / "napari.png")

    if args.finetune:
        instances = seg_widget.last_layers["instances"]
        truth = viewer.layers["im0015 expert mask"].data
        # The box where the model disagrees most with the expert mask: "corrected" from it.
        err = (np.asarray(instances.data) > 0) != (truth > 0)
        box = args.box
        scores = [(err[y:y + box, x:x + box].sum(), y, x) for y in range(0, 1024 - box + 1, 64)
                  for x in range(0, 1024 - box + 1, 64)]
        _, y, x = max(scores)
        viewer.reset_view()
        cam = camera(viewer)
        cam.center = ((y + box / 2) * 4.6, (x + box / 2) * 4.6)
        cam.zoom *= 2.5
        frames = Path(args.frames)
        frames.mkdir(parents=True, exist_ok=True)
        snap(viewer, frames / "napari_finetune_1.png")  # 1: the model's result there
        current = np.asarray(instances.data)
        region, true_box = current[y:y + box, x:x + box], truth[y:y + box, x:x + box] > 0
        # The whole box painted as a user would (data_setitem is what napari's brush calls): missed
        # mitochondria added, false ones erased, and the right ones painted over to confirm them,
        # so every pixel of the box is a training label (unpainted pixels are ignored).
        target = np.where(true_box, np.where(region > 0, region, int(current.max()) + 1), 0)
        for value in np.unique(target):
            rr, cc = np.nonzero(target == value)
            instances.data_setitem((rr + y, cc + x), int(value))
        ft = FinetuneWidget(viewer)
        viewer.window.add_dock_widget(ft, name="Fine-tune on my corrections", area="right")
        ft.refresh()
        ft.out.setText(str(HERE.parent / "runs" / "napari_docs_finetune"))
        ft.epochs.setValue(args.epochs)
        ft.steps.setValue(10)
        snap(viewer, frames / "napari_finetune_2.png")  # 2: corrected by painting, ready to fine-tune
        ft.run()
        wait(ft.job)
        print(ft.job.status.text())
        snap(viewer, frames / "napari_finetune_3.png")  # 3: segmented again by the fine-tuned model
        strip([frames / f"napari_finetune_{i}.png" for i in (1, 2, 3)], out / "napari_finetune.jpg",
              ["1. the model's result", "2. corrected with the brush", f"3. after fine-tuning ({ft.job.status.text().split('(')[-1].split(')')[0]})"])
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
