"""Export to the BioImage Model Zoo format: `python -m xmdl_tf.export --format bioimageio --out DIR`.

Writes a model package in the current bioimage.io spec (format 0.5) that
deepImageJ, ilastik, the bioimage.io Python tools (`bioimageio.core`) and the
Model Zoo website open without this toolkit:

    DIR/rdf.yaml              the description: inputs/outputs with axes, pixel size,
                              pre- and post-processing, authors, citations, license
    DIR/weights.keras         Keras 3 weights (format `keras_v3`, TensorFlow backend); left out for
                              a model with an xmdl_tf layer in its graph (`--input-blur`), which
                              plain Keras could not load
    DIR/tf_saved_model.zip    the same network as a TensorFlow SavedModel bundle
    DIR/test_input.npy        raw EM crop (1, y, x, 1) float32 from the sample slice
    DIR/test_output.npy       softmax (1, y, x, 2) float32 that the package must reproduce
    DIR/cover.png             the toolkit's unified figure on that crop
    DIR/README.md             documentation: what goes in and out, data, limits

The network's input is raw grey values; the package's preprocessing
reproduces the toolkit's normalisation (`xmdl_tf.data.normalize`: the
image's own 1st and 99.8th percentiles mapped to 0 and 1, then clipped), so
a consumer feeds raw EM. The output is the softmax over (background,
mitochondria) before the toolkit's temperature calibration and
post-processing (instances, morphometry, Grad-CAM stay in the toolkit).

The package is built in a hidden sibling folder, checked with `bioimageio.spec`
(and, by default, run with `bioimageio.core`'s model test, which loads both
weight formats and compares their output with test_output.npy), then renamed
into place: DIR holds a whole, valid package or nothing.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from . import cli
from .config import NORMALIZATION

log = logging.getLogger(__name__)

LICENSE = "CC-BY-NC-SA-4.0"  # derived from CC BY-NC-SA 3.0 and non-commercial training data (models/README.md)
TEST_TILE = 256  # test tensor side, px: a multiple of the network's size divisor
COVER_TILE = 512
SAMPLE_PIXEL_SIZE_NM = 4.6  # the shipped sample slice's (CDeep3M SBEM)
HALO = 32  # px each side that a tiling consumer should discard (half the toolkit's 64-px tile overlap)
RDF = "rdf.yaml"

# Citations for the training sets, keyed by the set's folder name in config.json "info".
DATA_CITATIONS = {
    "cdeep3m_sbem_mouse": [("Haberl et al. (2018) CDeep3M: plug-and-play cloud-based deep learning for image "
                            "segmentation. Nature Methods 15, 677-680 (mitochondria SBEM sample data)",
                            "10.1038/s41592-018-0106-z")],
    "drosophila_vnc_sstem": [("Gerhard, Funke, Martel, Cardona, Fetter (2013) Segmented anisotropic ssTEM dataset "
                              "of neural tissue. figshare", "10.6084/m9.figshare.856713")],
    "lucchipp_fibsem_mouse": [("Lucchi, Smith, Achanta, Knott, Fua (2012) Supervoxel-based segmentation of "
                               "mitochondria in EM image stacks with learned shape features. IEEE TMI 31(2)",
                               "10.1109/TMI.2011.2171705"),
                              ("Casser, Kang, Pfister, Haehn (2020) Fast mitochondria detection for connectomics. "
                               "MIDL 2020 (Lucchi++ labels)", "10.48550/arXiv.1812.06024")],
}
# The architecture, cited by every export.
ARCHITECTURE_CITATIONS = [
    ("Ronneberger, Fischer, Brox (2015) U-Net: convolutional networks for biomedical image segmentation. "
     "MICCAI 2015", "10.1007/978-3-319-24574-4_28"),
    ("Oktay et al. (2018) Attention U-Net: learning where to look for the pancreas. MIDL 2018",
     "10.48550/arXiv.1804.03999"),
]
# The XM-DL paper (Malik and Singh, 2026) has no DOI or URL to cite here, and the spec requires one:
# the package's README.md cites it instead.


class ZooError(ValueError):
    """The package could not be built or did not pass the bioimage.io checks (the message says which)."""


def sample_crop(size: int) -> np.ndarray:
    """Centre crop (size, size) of the shipped sample slice, raw grey values (uint8)."""
    from importlib import resources

    from .io import read_image

    path = Path(str(resources.files("xmdl_tf") / "sample" / "x"))
    image = read_image(sorted(path.iterdir())[0])
    h, w = image.shape
    if min(h, w) < size:
        raise ZooError(f"the sample slice ({h}x{w}) is smaller than the {size}-px test tile")
    y0, x0 = (h - size) // 2, (w - size) // 2
    return image[y0:y0 + size, x0:x0 + size]


def training_sets(config) -> list[str]:
    """Folder names of the sets the model was trained on, from config.json "info" (lineage included)."""
    names: list[str] = []

    def walk(entries):
        for e in entries or []:
            name = Path(str(e.get("path", ""))).name
            if name and name not in names:
                names.append(name)

    walk(config.info.get("data"))
    walk((config.info.get("lineage") or {}).get("config"))
    return names


def _citations(sets: list[str]):
    from bioimageio.spec.model.v0_5 import CiteEntry

    entries = ARCHITECTURE_CITATIONS + [c for s in sets for c in DATA_CITATIONS.get(s, [])]
    return [CiteEntry(text=text, doi=doi) for text, doi in entries]


def _documentation(config, sets: list[str], pixel_size_nm: float | None, n_params: int) -> str:
    px = (f"{pixel_size_nm:g} nm per pixel: resample your images to this pixel size first (a 2x larger pixel "
          "size halves the image), or use the xmdl_tf toolkit, which does it for you"
          if pixel_size_nm else
          "the training sets' own pixel grids (about 4-10 nm per pixel); it tolerates about "
          f"x{config.augment.scale[0]:g} to x{config.augment.scale[1]:g} (its training's random zoom)")
    temp = config.calibration.get("temperature") if config.calibration else None
    calib = (f"The toolkit divides the logit by a temperature of {temp:g} (fitted on validation data) for its "
             "uncertainty map and per-object confidence; masks threshold the uncalibrated softmax, which is this "
             "package's output." if temp else "The output is the network's softmax, not calibrated.")
    div = config.model.size_divisor
    rows = "\n".join(f"- `{s}`" for s in sets) or "- (not recorded)"
    return f"""# XM-DL mitochondria segmentation (xmdl_tf reference model)

A residual attention U-Net ({config.model.depth} levels, {config.model.base_filters} base filters, {n_params:,} parameters)
that finds mitochondria in 2-D electron-microscopy slices (TEM, SBEM, FIB-SEM), exported from the
`xmdl_tf` toolkit, an implementation of Malik and Singh (2026), "Explainable mitochondrial image
segmentation and morphological quantification using deep learning based framework" (XM-DL).

## Input and output

- **Input** `raw`: one grey-value EM slice, axes (batch, y, x, channel = 1), any height and width that
  are multiples of {div} (at least {2 * HALO + div}). Raw grey values: the preprocessing maps the image's 1st and 99.8th
  percentiles to 0 and 1 and clips, exactly as the toolkit does.
- **Pixel size**: {px}.
- **Output** `probabilities`: softmax over (background, mitochondria), axes (batch, y, x, channel = 2).
  Threshold channel 1 at {config.inference.threshold:g} for a mask (the toolkit's threshold for this model). When tiling, discard {HALO} px at each tile border (the halo).
  {calib}

The toolkit adds what this package does not carry: pixel-size resampling, test-time augmentation,
instance separation, morphometry and shape classes, Grad-CAM explanations, per-object confidence and an
out-of-distribution warning (`pip install xmdl-tf`, then `xmdl-analyze IMAGE --out RESULTS`).

## How to use it

- **bioimageio.core** (Python): `bioimageio.core.predict(model="rdf.yaml", inputs=image[None, :, :, None])`;
  `bioimageio test rdf.yaml` re-runs the packaged test.
- **deepImageJ** (Fiji): Plugins > deepImageJ > Install model > from a local zip of this folder, then run
  it on an 8- or 16-bit image with the model's pixel size.
- **ilastik**: Neural Network Workflow > load this folder's zip (TensorFlow weights need ilastik's
  TensorFlow backend).

## Training data

Trained on the train splits (model selection on the val splits only) of:
{rows}

The training data licenses are non-commercial and require attribution; so does this model
({LICENSE}). The model card in the toolkit's repository (`models/README.md`) gives the recipe, the
per-set test and leave-one-set-out figures, and the known limits: on EM from microscopes and tissues it
never saw it can mark myelin, dark neurites and granules as mitochondria and miss small ones; fine-tune
it on a few annotated slices (`xmdl-finetune`) before trusting counts there.
"""


def _cover(predictor, image: np.ndarray, dest: Path, pixel_size_nm: float | None) -> None:
    """The toolkit's unified figure for `image`, the package's cover."""
    from .analyze import analyze_image
    from .figure import unified_figure
    from .predict import MAX_RESAMPLE

    model_px = predictor.pixel_size_nm
    if model_px and not 1 / MAX_RESAMPLE <= pixel_size_nm / model_px <= MAX_RESAMPLE:
        # A model at a pixel size far from the sample's (beyond what analyze resamples): the
        # cover shows it on the sample's own grid rather than refusing the whole package.
        log.info("model pixel size %g nm is too far from the sample's %g nm to resample; cover on the sample's grid",
                 model_px, pixel_size_nm)
        pixel_size_nm = None
    a = analyze_image(predictor, image, "sample", pixel_size_nm=pixel_size_nm)
    # Three whole panels (input, classes, Grad-CAM; the uncertainty one left out), centred on a
    # white 2:1 canvas, the shape the zoo shows covers at: nothing cut off at an edge.
    unified_figure(a.image, a.instances, a.table, a.heatmap, dest, title="xmdl_tf reference model on the sample",
                   summary=a.summary)
    from PIL import Image

    with Image.open(dest) as im:
        w, h = im.size
        canvas = Image.new("RGB", (max(w, 2 * h), max(h, (w + 1) // 2)), "white")
        canvas.paste(im.convert("RGB"), ((canvas.width - w) // 2, (canvas.height - h) // 2))
    canvas.save(dest)


def _saved_model(net, dest: Path) -> None:
    """SavedModel whose `serve` endpoint returns {"probabilities": (b, y, x, 2)}: bioimageio.core's
    TensorFlow adapter (keras.layers.TFSMLayer) expects a dict of outputs."""
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(net)
    archive.add_endpoint(name="serve", fn=lambda x: {"probabilities": net(x, training=False)},
                         input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32, name="raw")])
    archive.write_out(str(dest), verbose=False)


def export_bioimageio(model: str | Path | None, out_dir: str | Path, *, validate: bool = True,
                      run_test: bool = True, overwrite: bool = False, model_id: str = "xmdl-mitochondria") -> Path:
    """Write a bioimage.io model package (format 0.5) of `model` into `out_dir`; return `out_dir/rdf.yaml`.

    model: run folder, `.keras` file or built-in name (None: the default model).
    run_test: also run `bioimageio.core.test_model` (loads the weights; seconds).
    An existing non-empty `out_dir` raises FileExistsError unless it holds an earlier package and overwrite
    is given (a file, or a folder of anything else, is never replaced).
    """
    from .data import normalize
    from .ood import model_distribution
    from .predict import ModelError, Predictor, is_saved_model, load_keras_with_config, resolve_model_path
    from .pretrained import model_or_default, resolve_model_spec
    from .runlock import atomic_replace_dir

    try:
        from bioimageio.spec import ValidationContext, save_bioimageio_package_as_folder
        from bioimageio.spec.model import v0_5 as bz
    except ImportError:
        raise ZooError("the bioimage.io export needs bioimageio.spec: pip install 'xmdl-tf[bioimageio]'") from None

    out = cli.check_out_folder(out_dir).resolve()  # (`.` has no name to stage a sibling by)
    if out.is_dir() and any(out.iterdir()):
        # --overwrite replaces an earlier package, never a folder of something else (it is deleted whole).
        if not any((out / name).is_file() for name in (RDF, "bioimageio.yaml")):
            raise FileExistsError(f"{out}: a folder that holds no bioimage.io package ({RDF}); choose another "
                                  "--out (--overwrite replaces only an earlier package)")
        if not overwrite:
            raise FileExistsError(f"{out}: already holds a bioimage.io package; choose another --out or pass "
                                  "--overwrite to replace it")
    model = model_or_default(model)
    if is_saved_model(resolve_model_spec(model)):
        raise ModelError(f"{model}: a SavedModel export; package the .keras model (run folder) it came from")
    if out.is_dir():  # an earlier package, replaced whole with --overwrite: it must not hold the model
        cli.refuse_replacing_input(out, resolve_model_path(model)[0])
    net, config, model_path = load_keras_with_config(model)
    # The network already loaded, wrapped for whole-slice inference (not loaded a second time).
    predictor = Predictor(net, config, model_path, jit_compile=False)
    model_distribution(predictor)  # a damaged ood.npz (read for the cover) named now, before the package is built
    if config.normalization.get("method", "percentile") != "percentile":
        raise ZooError(f"{model_path}: normalisation {config.normalization.get('method')!r} has no bioimage.io "
                       "equivalent")
    div = config.model.size_divisor
    min_size = 2 * HALO + div  # the output halo must leave something
    norm = {**NORMALIZATION, **config.normalization}  # a stored setting may leave the defaults out
    px = config.data.pixel_size_nm
    sets = training_sets(config)

    with tempfile.TemporaryDirectory(prefix="xmdl_bioimageio_") as tmp:
        work = Path(tmp)
        # Weights: a model loaded with compile=False carries no optimizer or custom loss, so any
        # Keras 3 loads it without this toolkit installed, unless a layer of this toolkit is part of
        # the graph (InputBlur): then only the SavedModel, which needs no Python classes, is shipped.
        own_layers = sorted({type(l).__name__ for l in net.layers if not type(l).__module__.startswith("keras.")})
        portable = not own_layers
        if portable:
            net.save(work / "weights.keras")
        else:
            log.info("the model has xmdl_tf layers (%s): shipping TensorFlow SavedModel weights only",
                     ", ".join(own_layers))
        _saved_model(net, work / "tf_saved_model")
        shutil.make_archive(str(work / "tf_saved_model"), "zip", work / "tf_saved_model")
        crop = sample_crop(TEST_TILE)
        x = crop.astype(np.float32)[None, :, :, None]
        y = np.asarray(net.predict(normalize(crop, norm["low"], norm["high"])
                                   [None, :, :, None], verbose=0), np.float32)
        np.save(work / "test_input.npy", x)
        np.save(work / "test_output.npy", y)
        _cover(predictor, sample_crop(COVER_TILE), work / "cover.png", SAMPLE_PIXEL_SIZE_NM)
        n_params = int(net.count_params())
        (work / "README.md").write_text(_documentation(config, sets, px, n_params))

        space = {"unit": "nanometer", "scale": float(px)} if px else {}
        raw, prob = bz.TensorId("raw"), bz.TensorId("probabilities")
        inputs = [bz.InputTensorDescr(
            id=raw, description="raw EM slice, grey values (8- or 16-bit)",
            axes=[bz.BatchAxis(),
                  bz.SpaceInputAxis(id=bz.AxisId("y"), size=bz.ParameterizedSize(min=min_size, step=div), **space),
                  bz.SpaceInputAxis(id=bz.AxisId("x"), size=bz.ParameterizedSize(min=min_size, step=div), **space),
                  bz.ChannelAxis(channel_names=[bz.Identifier("em")])],
            test_tensor=bz.FileDescr(source=work / "test_input.npy"),
            data=bz.IntervalOrRatioDataDescr(type="float32"),
            preprocessing=[
                bz.ScaleRangeDescr(kwargs=bz.ScaleRangeKwargs(
                    axes=[bz.AxisId("y"), bz.AxisId("x")], min_percentile=float(norm["low"]),
                    max_percentile=float(norm["high"]))),
                bz.ClipDescr(kwargs=bz.ClipKwargs(min=0.0, max=1.0)),
            ])]
        outputs = [bz.OutputTensorDescr(
            id=prob, description=f"softmax over (background, mitochondria); threshold channel 1 at "
                                  f"{config.inference.threshold:g}",
            axes=[bz.BatchAxis(),
                  bz.SpaceOutputAxisWithHalo(id=bz.AxisId("y"), halo=HALO,
                                             size=bz.SizeReference(tensor_id=raw, axis_id=bz.AxisId("y")), **space),
                  bz.SpaceOutputAxisWithHalo(id=bz.AxisId("x"), halo=HALO,
                                             size=bz.SizeReference(tensor_id=raw, axis_id=bz.AxisId("x")), **space),
                  bz.ChannelAxis(channel_names=[bz.Identifier("background"), bz.Identifier("mitochondria")])],
            test_tensor=bz.FileDescr(source=work / "test_output.npy"),
            data=bz.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)))]
        import keras
        import tensorflow as tf

        from . import __version__

        weights = bz.WeightsDescr(
            keras_v3=bz.KerasV3WeightsDescr(source=work / "weights.keras", keras_version=keras.__version__,
                                            backend=("tensorflow", tf.__version__)) if portable else None,
            tensorflow_saved_model_bundle=bz.TensorflowSavedModelBundleWeightsDescr(
                source=work / "tf_saved_model.zip", tensorflow_version=tf.__version__,
                parent="keras_v3" if portable else None))
        with ValidationContext(perform_io_checks=True):
            try:
                descr = bz.ModelDescr(
                    name="XM-DL mitochondria (xmdl_tf reference)",
                    description="Mitochondria segmentation in 2-D electron microscopy (TEM, SBEM, FIB-SEM): "
                                "a residual attention U-Net from the xmdl_tf toolkit.",
                    authors=[bz.Author(name="xmdl_tf developers")],
                    cite=_citations(sets), license=LICENSE,
                    documentation=bz.FileDescr(source=work / "README.md"),
                    covers=[bz.FileDescr(source=work / "cover.png")],
                    tags=["electron-microscopy", "mitochondria", "semantic-segmentation", "2d", "tensorflow",
                          "keras", "unet", "fib-sem", "sbem", "tem"],
                    version="0.1.0", inputs=inputs, outputs=outputs, weights=weights,
                    training_data=None,
                    config={"xmdl_tf": {"version": __version__, "model": str(model_path.name),
                                        "pixel_size_nm": px, "size_divisor": div,
                                        "calibration": config.calibration or None,
                                        "training_sets": sets}},
                )
            except Exception as err:  # pydantic's ValidationError lists every field; keep it on one line
                raise ZooError(f"the bioimage.io description is invalid: {' '.join(str(err).split())}") from None
        stage = out.with_name(f".{out.name}.partial")
        if stage.exists():
            shutil.rmtree(stage)
        try:
            save_bioimageio_package_as_folder(descr, output_path=stage)
            rdf = next(p for p in (stage / RDF, stage / "bioimageio.yaml") if p.is_file())
            if validate:
                check(rdf, run_test=run_test)
            atomic_replace_dir(stage, out)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
    return out / rdf.name


def check(rdf: str | Path, run_test: bool = True) -> dict:
    """Validate a package with bioimageio.spec (and run bioimageio.core's model test); ZooError if it fails.

    Returns {"format": "passed", "test": "passed" | "skipped"}.
    """
    from bioimageio.spec import load_model_description

    descr = load_model_description(str(Path(rdf).resolve()), perform_io_checks=True)
    summary = descr.validation_summary
    if summary.status not in ("passed", "valid-format"):
        raise ZooError(f"{rdf}: bioimage.io format check failed: {_errors(summary)}")
    result = {"format": "passed", "test": "skipped"}
    if run_test:
        # bioimageio.core writes its own KERAS_BACKEND (default "torch") into os.environ on import,
        # which every process this one starts later would inherit: pin it to the backend in use
        # while it runs, then put the environment back as it was.
        import keras

        before = os.environ.get("KERAS_BACKEND")
        os.environ["KERAS_BACKEND"] = keras.backend.backend()
        # Its TensorFlow backend also unzips the SavedModel weights into
        # "./bioimageio_unzipped_tf_weights" of the working directory (a fixed relative path):
        # run it from a scratch folder so the user's folder (or a repo checkout) is left untouched.
        cwd = os.getcwd()
        try:
            try:
                from bioimageio.core import test_model
            except ImportError:
                log.warning("bioimageio.core is not installed: the package's model test was skipped")
                return result
            with tempfile.TemporaryDirectory(prefix="xmdl_bioimageio_") as scratch:
                os.chdir(scratch)
                try:
                    summary = test_model(descr)
                finally:
                    os.chdir(cwd)
        finally:
            if before is None:
                os.environ.pop("KERAS_BACKEND", None)
            else:
                os.environ["KERAS_BACKEND"] = before
        if summary.status != "passed":
            raise ZooError(f"{rdf}: bioimage.io model test failed: {_errors(summary)}")
        result["test"] = "passed"
    return result


def _errors(summary) -> str:
    msgs = []
    for d in summary.details:
        for e in d.errors:
            msgs.append(f"{'.'.join(map(str, e.loc))}: {e.msg}" if getattr(e, "loc", None) else e.msg)
    return "; ".join(msgs)[:2000] or json.dumps(summary.model_dump(mode="json"))[:2000]
