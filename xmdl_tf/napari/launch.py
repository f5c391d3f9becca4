"""`xmdl-napari [FILE ...]` (or `python -m xmdl_tf.napari`): napari with the xmdl-tf widgets docked.

Opens the given images or volumes with the plugin's reader (pixel size from
the metadata becomes the layer scale), or the sample slice when none is
given with `--sample`, and docks "Segment mitochondria" and the object table.
"""
from __future__ import annotations

from .. import cli

PLUGIN = "xmdl-tf"
DOCKED = ("Segment mitochondria", "Mitochondria table")


def open_viewer(paths: list[str], sample: bool = False, show: bool = True):
    """(napari Viewer, {widget name: widget}) with the files opened and the widgets docked.

    show=False: no window is shown (scripts, tests)."""
    import napari

    viewer = napari.Viewer(title="xmdl-tf", show=show)
    widgets = {name: viewer.window.add_plugin_dock_widget(PLUGIN, name)[1] for name in DOCKED}
    for path in paths:
        viewer.open(path, plugin=PLUGIN)
    if sample:
        viewer.open_sample(PLUGIN, "em_slice")
    return viewer, widgets


@cli.guarded
def main(argv: list[str] | None = None) -> int:
    p = cli.parser("xmdl-napari", "Open napari with the xmdl-tf widgets (segment, object table) docked.")
    p.add_argument("paths", nargs="*", help="images, stacks or volumes to open (PNG, TIFF, HDF5, Zarr, N5)")
    p.add_argument("--sample", action="store_true", help="also open the shipped sample slice")
    args = p.parse_args(argv)
    from pathlib import Path

    for path in args.paths:
        file = path if Path(path).exists() or ":" not in path else path.rsplit(":", 1)[0]  # file.h5:/dataset
        if not Path(file).exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
    try:
        import napari
    except ImportError:
        raise cli.UsageError("napari is not installed: pip install 'xmdl-tf[napari]'") from None
    open_viewer(args.paths, args.sample)
    napari.run()
    return 0
