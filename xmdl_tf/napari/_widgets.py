"""The plugin's dock widgets: thin Qt shells over `xmdl_tf.napari.layers`.

Each long job runs in a napari `thread_worker` (its work handed to one long-lived Python
thread, `_on_python_thread`, where TensorFlow is safe); progress comes back through a
Qt signal (queued into the GUI thread), Cancel sets an event that the job
checks between tiles, slices or training steps, and the result layers are
added in the GUI thread when the job returns.
"""
from __future__ import annotations

import concurrent.futures
import html
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import QObject, Qt, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from . import layers as L

MODE_LABELS = {"slice": "2D slice (current)", "volume": "whole stack as a volume",
               "chunked": "whole stack in chunks (from its file)"}
# Widgets of each viewer, so the fine-tune widget can hand its new model to the segment widget.
_SEGMENT_WIDGETS: "weakref.WeakSet[SegmentWidget]" = weakref.WeakSet()
_TABLE_WIDGETS: "weakref.WeakSet[ObjectTableWidget]" = weakref.WeakSet()
_HELD_TABLES: dict = {}  # id(viewer) -> table of viewers without a window (ViewerModel)


_PYTHON_THREAD: concurrent.futures.ThreadPoolExecutor | None = None


def _on_python_thread(func):
    """func(*args, **kwargs), run on one long-lived thread that Python started, waited for here.

    napari's workers run on Qt's pool threads; TensorFlow building a new graph (a new tile size,
    a new model) on such a thread, after an earlier job on another one, segfaulted or hung with
    the GIL unowned (the second Segment run of a session). One Python thread for every job
    avoids that; the Qt worker only waits (its GIL released) and relays the result or error.
    """
    global _PYTHON_THREAD
    if _PYTHON_THREAD is None:
        _PYTHON_THREAD = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="xmdl-napari")

    def run(*args, **kwargs):
        return _PYTHON_THREAD.submit(func, *args, **kwargs).result()

    return run


class _Relay(QObject):
    """Carries a worker thread's progress into the GUI thread (queued connection)."""

    progress = Signal(int, int)
    preview = Signal(object)  # a chunked run's store, after each chunk of probability


class _Job(QWidget):
    """Run / Cancel buttons, a progress bar and a status line for one background job at a time."""

    def __init__(self, run_text: str, parent: QWidget | None = None):
        super().__init__(parent)
        self.run_button = QPushButton(run_text)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.bar = QProgressBar()
        self.bar.setRange(0, 1)
        self.bar.setValue(0)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        box = QVBoxLayout(self)
        box.setContentsMargins(0, 0, 0, 0)
        box.addLayout(buttons)
        box.addWidget(self.bar)
        box.addWidget(self.status)
        self.relay = _Relay()
        self.relay.progress.connect(self._on_progress)
        self.cancel_button.clicked.connect(self.cancel)
        self.worker = None
        self.cancel_event = threading.Event()

    @property
    def running(self) -> bool:
        return self.worker is not None

    def start(self, func, *args, on_done, **kwargs):
        """Run func(*args, progress=..., cancel=..., **kwargs) in a thread_worker; on_done(result) in the GUI."""
        from napari.qt.threading import thread_worker

        self.cancel_event = threading.Event()
        kwargs.update(progress=self.relay.progress.emit, cancel=self.cancel_event)
        # Connected here, errors reach _on_error instead of being re-raised in the GUI thread.
        connect = {"returned": on_done, "errored": self._on_error, "finished": self._on_finished}
        worker = thread_worker(_on_python_thread(func), start_thread=False, connect=connect)(*args, **kwargs)
        self.worker = worker
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.bar.setRange(0, 0)  # busy until the first step reports
        self.t0 = time.time()
        worker.start()
        return worker

    def cancel(self) -> None:
        if self.running:
            self.cancel_event.set()
            self.status.setText("cancelling...")

    def _on_progress(self, done: int, total: int) -> None:
        self.bar.setRange(0, max(total, 1))
        self.bar.setValue(done)

    def _on_error(self, err: Exception) -> None:
        if isinstance(err, L.Cancelled):
            self.status.setText("cancelled")
        else:
            self.status.setText(f"<span style='color:#e05050'>{html.escape(type(err).__name__)}: "
                                f"{html.escape(str(err))}</span>")

    def _on_finished(self) -> None:
        self.worker = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.bar.setRange(0, 1)
        self.bar.setValue(1 if not self.cancel_event.is_set() else 0)


def _model_row(parent: QWidget, line: QLineEdit) -> QHBoxLayout:
    """The model path field with buttons to pick a run / SavedModel folder or a .keras file."""
    row = QHBoxLayout()
    row.addWidget(line)
    folder, file = QPushButton("Folder..."), QPushButton(".keras...")
    folder.clicked.connect(lambda: _pick(parent, line, folder=True))
    file.clicked.connect(lambda: _pick(parent, line, folder=False))
    row.addWidget(folder)
    row.addWidget(file)
    return row


def _pick(parent: QWidget, line: QLineEdit, folder: bool) -> None:
    if folder:
        path = QFileDialog.getExistingDirectory(parent, "Run folder or exported SavedModel", line.text())
    else:
        path, _ = QFileDialog.getOpenFileName(parent, "Keras model", line.text(), "Keras model (*.keras)")
    if path:
        line.setText(path)
        line.editingFinished.emit()  # setText alone would not prefill the form from the picked model


# ----------------------------------------------------------------------------
# Segment


class SegmentWidget(QWidget):
    """"Segment mitochondria": the current slice, or the whole stack in 3-D, of an image layer."""

    def __init__(self, napari_viewer):
        super().__init__()
        from ..config import InferenceConfig

        self.viewer = napari_viewer
        defaults = InferenceConfig()
        self.layer_box = QComboBox()
        default = L.model_path(None) if _has_default_model() else ""
        self.model = QLineEdit(str(default))
        self.model.setPlaceholderText("run folder, .keras file or exported SavedModel")
        self.pixel_size = _spin(0.0, 10000.0, 0.0, 3, " nm", "0 = unknown (measure in pixels, no resampling)")
        self.z_size = _spin(0.0, 10000.0, 0.0, 3, " nm", "section thickness / z step; 0 = unknown")
        self.mode = QComboBox()
        for key, text in MODE_LABELS.items():
            self.mode.addItem(text, key)
        self.tta = QCheckBox("test-time augmentation (8x slower)")
        self.threshold = _spin(0.01, 0.99, defaults.threshold, 2, "", "foreground is probability >= threshold")
        self.threshold.setSingleStep(0.05)
        self.min_area = _spin(0.0, 1e9, defaults.min_area_nm2, 0, " nm²",
                              "smallest object when the pixel size is known")
        self.min_size = QSpinBox()
        self.min_size.setRange(0, 10**7)
        self.min_size.setValue(defaults.min_size_px)
        self.min_size.setSuffix(" px")
        self.min_size.setToolTip("smallest object when the pixel size is unknown")
        self.separate = QCheckBox("separate touching mitochondria")
        self.separate.setChecked(defaults.separate)
        self.job = _Job("Segment")
        # Only for "whole stack in chunks": where the OME-Zarr goes, Dask workers, chunk size.
        self.store = QLineEdit("")
        self.store.setPlaceholderText("<stack>.xmdl.zarr beside the stack's file")
        self.workers = QSpinBox()
        self.workers.setRange(1, 64)
        self.workers.setValue(1)
        self.workers.setToolTip("local Dask worker processes (each loads the model once)")
        self.scheduler = QLineEdit("local")
        self.scheduler.setToolTip("'local' (Dask workers on this machine) or a scheduler address, tcp://host:8786")
        self.chunks = QLineEdit(" ".join(map(str, L.SegmentSettings().chunks)))
        self.chunks.setToolTip("chunk size z y x in voxels (y, x at least twice the 64 px halo)")

        form = QFormLayout()
        form.addRow("image layer", self.layer_box)
        form.addRow("model", _model_row(self, self.model))
        form.addRow("pixel size", self.pixel_size)
        form.addRow("z step", self.z_size)
        form.addRow("run on", self.mode)
        form.addRow("", self.tta)
        form.addRow("threshold", self.threshold)
        form.addRow("min. area", self.min_area)
        form.addRow("min. size", self.min_size)
        form.addRow("", self.separate)
        # Shown only in the chunked mode.
        self.chunked_box = QWidget()
        sub = QFormLayout(self.chunked_box)
        sub.setContentsMargins(0, 0, 0, 0)
        sub.addRow("chunked output", self.store)
        sub.addRow("Dask scheduler", self.scheduler)
        sub.addRow("workers", self.workers)
        sub.addRow("chunks (z y x)", self.chunks)
        form.addRow(self.chunked_box)
        self.chunked_box.setVisible(False)
        box = QVBoxLayout(self)
        box.addLayout(form)
        box.addWidget(self.job)
        box.addStretch(1)

        self.job.run_button.clicked.connect(self.run)
        self.mode.currentIndexChanged.connect(
            lambda *_: self.chunked_box.setVisible(self.mode.currentData() == "chunked"))
        self.layer_box.currentIndexChanged.connect(self._on_layer)
        self.model.editingFinished.connect(self._prefill_from_model)
        self._shown_layer = None  # the layer the list shows as chosen
        for layer in napari_viewer.layers:  # renaming a layer refreshes the list too
            layer.events.name.connect(self._refresh_layers)
        napari_viewer.layers.events.inserted.connect(self._on_inserted)
        napari_viewer.layers.events.removed.connect(self._refresh_layers)
        self._refresh_layers()
        self._prefill_from_model()
        self.last: L.Segmentation | None = None
        self.last_layers: dict = {}
        self._running_layer = None
        self.job.relay.preview.connect(self._preview)
        _SEGMENT_WIDGETS.add(self)

    # -- inputs

    def _on_inserted(self, event) -> None:
        event.value.events.name.connect(self._refresh_layers)
        self._refresh_layers(event)

    def _refresh_layers(self, event=None) -> None:
        from napari.layers import Image

        current = self.layer_box.currentText()
        renamed = getattr(event, "source", None)  # a layer's name event: follow the layer, not its old name
        if renamed is not None and getattr(event, "type", "") == "name" and self._shown_layer is renamed:
            current = renamed.name
        names = [layer.name for layer in self.viewer.layers if isinstance(layer, Image)
                 and not layer.name.endswith((" probability", " gradcam", " uncertainty"))]
        self.layer_box.blockSignals(True)
        self.layer_box.clear()
        self.layer_box.addItems(names)
        active = self.viewer.layers.selection.active
        pick = current if current in names else (active.name if active is not None and active.name in names else None)
        if pick:
            self.layer_box.setCurrentText(pick)
        self.layer_box.blockSignals(False)
        self._shown_layer = self.image_layer()
        if pick != current:
            self._on_layer()

    def image_layer(self):
        name = self.layer_box.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def _on_layer(self, *_) -> None:
        """Prefill pixel size and z step from the layer; offer the volume modes for stacks only
        (the chunked one for stacks read from a file)."""
        from ._reader import pixel_size_of, voxel_size_of

        self._shown_layer = self.image_layer()

        layer = self.image_layer()
        if layer is None:
            return
        self.pixel_size.setValue(pixel_size_of(layer) or 0.0)
        voxel = voxel_size_of(layer) if layer.ndim >= 3 else None
        self.z_size.setValue(voxel[0] if voxel else 0.0)
        stack = layer.ndim >= 3
        self.mode.model().item(1).setEnabled(stack)
        self.mode.model().item(2).setEnabled(stack and L.layer_source(layer) is not None)
        if not stack:
            self.mode.setCurrentIndex(0)
        self.z_size.setEnabled(stack)

    def _prefill_from_model(self) -> None:
        """Threshold, minimum sizes, TTA and separation from the model's config.json (its inference settings)."""
        from ..config import Config
        from ..predict import is_saved_model, resolve_model_path

        try:
            path = L.model_path(self.model.text())
            if is_saved_model(path):  # an export keeps its config in assets/xmdl.json
                from ..export import read_metadata

                ic = Config.from_dict(read_metadata(path)["config"]).inference
            else:
                cfg = resolve_model_path(path)[1]
                ic = Config.load(cfg).inference if cfg else None
        except (OSError, ValueError, KeyError):
            ic = None
        if ic is not None:
            self.tta.setChecked(ic.tta)
            self.threshold.setValue(ic.threshold)
            self.min_area.setValue(ic.min_area_nm2)
            self.min_size.setValue(ic.min_size_px)
            self.separate.setChecked(ic.separate)

    def settings(self) -> L.SegmentSettings:
        """The form as SegmentSettings (ValueError for chunk sizes that are not three positive integers)."""
        try:
            chunks = tuple(int(v) for v in self.chunks.text().replace(",", " ").split())
        except ValueError:
            chunks = ()
        if len(chunks) != 3 or min(chunks) < 1:
            if self.mode.currentData() == "chunked":
                raise ValueError(f"chunks: three positive sizes z y x, got {self.chunks.text()!r}")
            chunks = L.SegmentSettings().chunks  # not used outside the chunked mode
        return L.SegmentSettings(model=self.model.text().strip() or None, mode=self.mode.currentData(),
                                 pixel_size_nm=self.pixel_size.value() or None,
                                 z_size_nm=self.z_size.value() or None, tta=self.tta.isChecked(),
                                 threshold=self.threshold.value(), min_area_nm2=self.min_area.value(),
                                 min_size_px=self.min_size.value(), separate=self.separate.isChecked(),
                                 out=self.store.text().strip() or None, workers=self.workers.value(),
                                 chunks=chunks, scheduler=self.scheduler.text().strip() or "local")

    # -- running

    @property
    def running(self) -> bool:
        return self.job.running

    def run(self):
        """Start segmenting the chosen layer; returns the worker (None when there is nothing to run)."""
        layer = self.image_layer()
        if layer is None:
            self.job.status.setText("open an image first")
            return None
        try:
            s = L.resolve_mode(layer, self.settings())
            if s.mode == "chunked":
                source = L.layer_source(layer)
                self.job.status.setText(f"segmenting {layer.name} in chunks into {L.chunked_store(source, s.out)}...")
                self._running_layer = layer
                return self.job.start(L.segment_chunked, source, s, layer.name, preview=self.job.relay.preview.emit,
                                      on_done=lambda seg: self._show(seg, layer))
            data, z = L.layer_input(self.viewer, layer, s.mode)
        except ValueError as err:
            self.job.status.setText(str(err))
            return None
        where = f" (slice {z})" if z is not None else ""
        self.job.status.setText(f"segmenting {layer.name}{where}...")
        return self.job.start(L.segment_array, data, s, layer.name, z=z,
                              on_done=lambda seg: self._show(seg, layer))

    def _preview(self, store) -> None:
        """A chunked run's probability so far (GUI thread; the worker emits after each chunk)."""
        layer = self._running_layer
        if layer is not None and layer in self.viewer.layers:
            L.show_preview(self.viewer, layer.name, store, layer)

    def _show(self, seg: L.Segmentation, layer) -> None:
        image_layer = layer if layer in self.viewer.layers else None
        self.last = seg
        self.last_layers = L.show_segmentation(self.viewer, seg, image_layer)
        table = object_table(self.viewer)
        table.set_result(self.last_layers["instances"], seg.table, seg.mode)
        unit = "3-D " if seg.mode == "volume" else ""
        kept = self.last_layers.get("kept_corrections")
        self.job.status.setText(f"{len(seg.table)} {unit}mitochondria in {time.time() - self.job.t0:.1f} s "
                                f"({Path(seg.model).name})"
                                + (f"; your corrections are kept in the layer '{html.escape(kept)}'" if kept else ""))


def _has_default_model() -> bool:
    from ..pretrained import default_model_path

    return default_model_path() is not None


def _spin(lo: float, hi: float, value: float, decimals: int, suffix: str, tip: str) -> QDoubleSpinBox:
    s = QDoubleSpinBox()
    s.setRange(lo, hi)
    s.setDecimals(decimals)
    s.setValue(value)
    s.setSuffix(suffix)
    s.setToolTip(tip)
    return s


# ----------------------------------------------------------------------------
# Object table


class _SortItem(QTableWidgetItem):
    """A cell that sorts by its value (numbers numerically), shown formatted."""

    def __init__(self, value: Any):
        if isinstance(value, (bool, np.bool_)):
            text = "yes" if value else "no"
        elif isinstance(value, (float, np.floating)):
            text = "" if np.isnan(value) else (f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}")
        else:
            text = str(value)
        super().__init__(text)
        self.key = value if isinstance(value, (int, float, np.integer, np.floating)) and not (
            isinstance(value, (float, np.floating)) and np.isnan(value)) else None
        self.setFlags(self.flags() & ~Qt.ItemIsEditable)

    def __lt__(self, other: QTableWidgetItem) -> bool:
        a, b = self.key, getattr(other, "key", None)
        if a is not None and b is not None:
            return float(a) < float(b)
        if (a is None) != (b is None):
            return a is None  # empty cells first
        return self.text() < other.text()


class ObjectTableWidget(QWidget):
    """One row per mitochondrion (the morphometry table), in sync with the instances layer.

    Clicking a row selects that label and centres the view on it; selecting a
    label in the layer selects its row. Sort by clicking a header; filter
    with a pandas query (e.g. `shape_class == "round" and area_nm2 > 50000`);
    export the rows shown as CSV. The line at the top counts each shape class
    in its colour (the legend of the instances layer).
    """

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.layer = None
        self.mode = "slice"
        self.data = None  # the whole table (pandas)
        self.shown = None  # the rows passing the filter
        self.counts = QLabel("no objects yet: run Segment mitochondria")
        self.counts.setTextFormat(Qt.RichText)
        self.counts.setWordWrap(True)
        self.filter = QLineEdit()
        self.filter.setPlaceholderText("filter: e.g. shape_class == 'round' and area_nm2 > 50000")
        self.filter.editingFinished.connect(lambda: self.set_filter(self.filter.text()))
        self.view = QTableWidget()
        self.view.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.view.setSelectionMode(QAbstractItemView.SingleSelection)
        self.view.setSortingEnabled(True)
        self.view.itemSelectionChanged.connect(self._on_row_selected)
        self.export_button = QPushButton("Export CSV...")
        self.export_button.clicked.connect(self._export_dialog)
        self.note = QLabel("")
        box = QVBoxLayout(self)
        box.addWidget(self.counts)
        box.addWidget(self.filter)
        box.addWidget(self.view, 1)
        row = QHBoxLayout()
        row.addWidget(self.note, 1)
        row.addWidget(self.export_button)
        box.addLayout(row)
        self._syncing = False
        _TABLE_WIDGETS.add(self)

    def set_result(self, labels_layer, table, mode: str = "slice") -> None:
        """Show `table` (pandas, one row per id of `labels_layer`) and follow the layer's selected label."""
        if self.layer is not None:
            try:
                self.layer.events.selected_label.disconnect(self._on_label_selected)
            except (TypeError, ValueError, RuntimeError):
                pass
        self.layer, self.mode = labels_layer, mode
        table = table.drop(columns=[c for c in ("image", "volume") if c in table]).reset_index(drop=True)
        first = [c for c in ("id", "shape_class", "area_nm2", "area_px2", "volume_nm3", "volume_vox") if c in table]
        self.data = table[first + [c for c in table.columns if c not in first]]
        labels_layer.events.selected_label.connect(self._on_label_selected)
        self._update_counts()
        self.set_filter(self.filter.text())

    def _update_counts(self) -> None:
        from ..figure import CLASS_COLORS, CLASS_COLORS_3D

        palette = CLASS_COLORS_3D if self.mode == "volume" else CLASS_COLORS
        parts = [f"<span style='color:{palette[c]}'>&#9632;</span>&nbsp;{c}&nbsp;<b>{n}</b>"
                 for c, n in L.class_counts(self.data, self.mode).items()]
        self.counts.setText(f"<b>{len(self.data)}</b> mitochondria: " + " &nbsp; ".join(parts))

    def set_filter(self, query: str) -> None:
        """Show the rows matching a pandas query ('' shows all); a bad query shows its error."""
        if self.data is None:
            return
        query = (query or "").strip()
        if self.filter.text() != query:
            self.filter.setText(query)
        try:
            shown = self.data.query(query) if query else self.data
            note = f"{len(shown)} of {len(self.data)} shown"
        except Exception as err:  # noqa: BLE001 - any pandas parse / name error is the user's query
            # All rows of *this* table: never the previous result's rows under a new result.
            shown = self.data
            note = (f"<span style='color:#e05050'>filter: {html.escape(str(err))}</span> "
                    f"(all {len(self.data)} shown)")
        self.shown = shown
        self.note.setText(note)
        self._fill(shown)

    def _fill(self, df) -> None:
        self._syncing = True
        self.view.setSortingEnabled(False)
        self.view.clear()
        self.view.setColumnCount(len(df.columns))
        self.view.setRowCount(len(df))
        self.view.setHorizontalHeaderLabels([str(c) for c in df.columns])
        for r, values in enumerate(df.itertuples(index=False)):
            for c, v in enumerate(values):
                self.view.setItem(r, c, _SortItem(v.item() if hasattr(v, "item") else v))
        self.view.setSortingEnabled(True)
        self.view.resizeColumnsToContents()
        self._syncing = False

    # -- selection

    def row_ids(self) -> list[int]:
        """The ids of the rows in their displayed (sorted) order."""
        col = self._id_column()
        return [int(self.view.item(r, col).key) for r in range(self.view.rowCount())]

    def _id_column(self) -> int:
        return [self.view.horizontalHeaderItem(c).text() for c in range(self.view.columnCount())].index("id")

    def selected_id(self) -> int | None:
        rows = self.view.selectionModel().selectedRows() if self.view.selectionModel() else []
        if not rows:
            return None
        return int(self.view.item(rows[0].row(), self._id_column()).key)

    def _on_row_selected(self) -> None:
        if self._syncing:
            return
        label = self.selected_id()
        if label is not None:
            self.select_object(label)

    def select_object(self, label: int) -> None:
        """Select `label` in the layer (which selects its row) and centre the view on its centroid."""
        self.layer.selected_label = int(label)
        self._on_label_selected()  # no event when the label was selected already
        row = self.data.loc[self.data["id"] == label]
        if row.empty:
            return
        world = self._centroid_world(row.iloc[0])
        dims = self.viewer.dims
        lead = dims.ndim - len(world)
        for i, v in enumerate(world[:-2]):
            dims.set_point(lead + i, float(v))
        camera(self.viewer).center = tuple(float(v) for v in world[-dims.ndisplay:])

    def _centroid_world(self, row) -> np.ndarray:
        if self.mode == "volume":
            data = [row["centroid_z_vox"], row["centroid_y_vox"], row["centroid_x_vox"]]
        else:
            data = [row["centroid_y_px"], row["centroid_x_px"]]
            if self.layer.ndim == 3:  # a slice of a stack, shown as (1, Y, X)
                data = [0.0, *data]
        return np.asarray(self.layer.data_to_world(data), float)

    def _on_label_selected(self, event=None) -> None:
        label = int(self.layer.selected_label)
        if self._syncing or self.data is None:
            return
        self._syncing = True
        try:
            ids = self.row_ids()
            if label in ids:
                r = ids.index(label)
                self.view.selectRow(r)
                self.view.scrollToItem(self.view.item(r, 0))
            else:
                self.view.clearSelection()
        finally:
            self._syncing = False

    # -- export

    def export_csv(self, path: str | Path) -> Path:
        """Write the rows shown (filtered) to `path` as CSV."""
        rows = self.shown if self.shown is not None else self.data
        if rows is None:
            raise ValueError("no objects to export yet: segment an image first")
        path = Path(path)
        rows.to_csv(path, index=False)
        self.note.setText(f"wrote {len(rows)} rows to {path.name}")
        return path

    def _export_dialog(self) -> None:
        if self.data is None:
            return
        path, _ = QFileDialog.getSaveFileName(self, "Export objects", "objects.csv", "CSV (*.csv)")
        if path:
            self.export_csv(path)


def camera(viewer):
    """The viewer's camera (`viewer.scene.camera` from napari 0.9, `viewer.camera` before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def object_table(viewer) -> ObjectTableWidget:
    """The viewer's object table dock, added on first use."""
    for w in list(_TABLE_WIDGETS):
        if w.viewer is viewer:
            return w
    w = ObjectTableWidget(viewer)
    window = getattr(viewer, "window", None)
    if window is not None and hasattr(window, "add_dock_widget"):
        window.add_dock_widget(w, name="Mitochondria (xmdl-tf)", area="right")
    else:
        # No window holds a dock for a bare ViewerModel: keep the table alive here, or the
        # weak registry loses it to the garbage collector between two calls.
        _HELD_TABLES[id(viewer)] = w
    return w


# ----------------------------------------------------------------------------
# Fine-tune


class FinetuneWidget(QWidget):
    """"Fine-tune on my corrections": train the current model on the slices edited by hand.

    Edit an instances layer with napari's brush, eraser or fill (label 0
    erases) on a few slices; only the pixels you changed or brushed are used,
    the rest is ignored by the loss. Or draw a new labels layer over an
    image (napari's "new labels layer" button) and paint every mitochondrion
    of a few slices: each slice with a label counts as fully annotated. The
    new model (with its parent in config.json) then segments the corrected
    and annotated images again.
    """

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.info = QLabel("")
        self.info.setWordWrap(True)
        self.refresh_button = QPushButton("Refresh")
        self.refresh_button.clicked.connect(self.refresh)
        self.model = QLineEdit("")
        self.model.setPlaceholderText("the model that made the edited layer")
        self.out = QLineEdit("")
        self.out.setPlaceholderText("new run folder (default: runs/<model>_corrected_<time>)")
        self.epochs = QSpinBox()
        self.epochs.setRange(1, 1000)
        self.epochs.setValue(10)
        self.steps = QSpinBox()
        self.steps.setRange(1, 10000)
        self.steps.setValue(20)
        self.lr = QDoubleSpinBox()
        self.lr.setDecimals(6)
        self.lr.setRange(1e-6, 1e-1)
        self.lr.setSingleStep(1e-4)
        self.lr.setValue(1e-4)
        self.tile = QSpinBox()
        self.tile.setRange(0, 4096)
        self.tile.setValue(0)
        self.tile.setSpecialValueText("auto")
        self.job = _Job("Fine-tune")
        form = QFormLayout()
        row = QHBoxLayout()
        row.addWidget(self.info, 1)
        row.addWidget(self.refresh_button)
        form.addRow(row)
        form.addRow("model", _model_row(self, self.model))
        form.addRow("save as", self.out)
        form.addRow("epochs", self.epochs)
        form.addRow("steps / epoch", self.steps)
        form.addRow("learning rate", self.lr)
        form.addRow("tile", self.tile)
        box = QVBoxLayout(self)
        box.addLayout(form)
        box.addWidget(self.job)
        box.addStretch(1)
        self.job.run_button.clicked.connect(self.run)
        self.last: L.FinetuneResult | None = None
        self.annotations: list[L.Annotation] = []
        self.refresh()

    def refresh(self) -> list[L.Correction]:
        """Count the edited and annotated slices now; fill the model field from the edited layer's
        model (else the Segment widget's). Returns every slice to learn from."""
        try:
            layers = L.corrected_layers(self.viewer)
            corrections = [c for layer in layers for c in L.corrections_of(layer)]
        except ValueError as err:  # a tracked layer whose data was replaced by another shape
            self.info.setText(f"<span style='color:#e05050'>{html.escape(str(err))}; segment it again to "
                              "correct it</span>")
            return []
        segment = next((w for w in list(_SEGMENT_WIDGETS) if w.viewer is self.viewer), None)
        try:
            settings = segment.settings() if segment else None
        except ValueError:  # its chunk sizes, which a slice does not use
            settings = None
        typed = {segment.layer_box.currentText(): settings.pixel_size_nm} if settings and settings.pixel_size_nm else {}
        self.annotations = L.drawn_annotations(self.viewer, settings, typed)
        drawn = [c for a in self.annotations for c in a.corrections]
        parts = []
        if corrections:
            n = sum(c.n_edited for c in corrections)
            parts.append(f"{len(corrections)} edited slice(s), {n:,} edited pixels in "
                         f"{', '.join(layer.name for layer in layers)}")
            if not self.model.text():
                self.model.setText(str(L.EditTracker.of(layers[0]).seg.model))
        if drawn:
            parts.append(f"{len(drawn)} annotated slice(s) in "
                         f"{', '.join(f'{a.labels.name} (over {a.image.name})' for a in self.annotations)}")
        if not self.model.text() and segment is not None:
            self.model.setText(segment.model.text())
        self.info.setText("; ".join(parts) if parts else
                          "no edits yet: correct an instances layer with the brush / eraser, or paint the "
                          "mitochondria of a slice in a new labels layer over the image, then Refresh")
        return [*corrections, *drawn]

    @property
    def running(self) -> bool:
        return self.job.running

    def run(self):
        """Start fine-tuning on the current edits; returns the worker (None when there are none)."""
        learn = self.refresh()
        if not learn:
            self.job.status.setText("nothing to learn from: no edited pixels")
            return None
        layers = L.corrected_layers(self.viewer)
        corrections = [c for layer in layers for c in L.corrections_of(layer)]
        model = self.model.text().strip() or None
        parent = L.model_path(model)
        out = self.out.text().strip() or str(Path("runs") / f"{parent.name}_corrected_{time.strftime('%Y%m%d-%H%M%S')}")
        self.job.status.setText(f"fine-tuning {parent.name} on {len(learn)} slice(s) -> {out}")
        return self.job.start(L.finetune_and_resegment, layers, corrections, model, out,
                              annotations=self.annotations,
                              epochs=self.epochs.value(), steps_per_epoch=self.steps.value(),
                              learning_rate=self.lr.value(), tile_size=self.tile.value() or None,
                              isolate=True, on_done=self._show)

    def _show(self, result: L.FinetuneResult) -> None:
        self.last = result
        shown = L.show_finetune(self.viewer, result)
        for w in list(_SEGMENT_WIDGETS):
            if w.viewer is self.viewer:
                w.model.setText(str(result.run))
        if shown:
            seg = result.segmentations[-1][1]
            object_table(self.viewer).set_result(shown[result.segmentations[-1][0].name]["instances"], seg.table,
                                                 seg.mode)
        self.model.setText(str(result.run))
        self.job.status.setText(f"saved {result.run} ({result.seconds:.0f} s); re-segmented "
                                f"{len(shown)} layer(s) with it")
        self.refresh()
