"""Fine-tuning in its own process, for the napari widget: `python -m xmdl_tf.napari._finetune_job SPEC.json`.

The child trains, then segments the corrected images again with the new
model and pickles those results (`Segmentation` objects) to the file the
spec names; the viewer only shows them. A child process keeps the viewer
responsive (training holds no GIL there), can be stopped at once by Cancel,
and keeps TensorFlow's model building away from napari's OpenGL driver:
loading the fine-tuned model in the viewer's process after a window had
drawn with Mesa's llvmpipe crashed it (segfault in a TensorFlow kernel) in 2
of 4 scripted runs here. It reports each training step as one line `step` on
stdout; errors end with one line `error: ...` on stderr and exit code 2.
"""
from __future__ import annotations

import json
import sys

STEP_LINE = "step"


def run(spec: dict) -> int:
    import keras

    from ..train import build_parser, config_from_args, train

    args = build_parser("xmdl_tf.napari", finetune=True).parse_args(spec["argv"])

    class _Steps(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            print(STEP_LINE, flush=True)

    run_dir = train(args.data, args.out, config_from_args(args), init_from=spec["init_from"],
                    augment_strength=args.augment_strength, overwrite=spec["overwrite"], verbose=0,
                    callbacks=[_Steps()])
    if spec.get("resegment"):
        resegment(spec["resegment"], run_dir)
    print(json.dumps({"run": str(run_dir)}), flush=True)
    return 0


def resegment(job_file: str, run_dir) -> None:
    """Segment the job's images with the model in run_dir; the results replace the job in the file."""
    import pickle
    from dataclasses import replace

    from .layers import segment_array

    with open(job_file, "rb") as f:
        jobs = pickle.load(f)  # written by the parent, our own temporary file
    out = []
    for image, settings, name, z in jobs:
        out.append(segment_array(image, replace(settings, model=run_dir), name, z=z))
    with open(job_file, "wb") as f:
        pickle.dump(out, f, protocol=pickle.HIGHEST_PROTOCOL)


def main(argv: list[str] | None = None) -> int:
    from .. import cli

    argv = sys.argv[1:] if argv is None else argv
    return cli.guarded(lambda _: run(json.loads(open(argv[0]).read())))(argv)


if __name__ == "__main__":
    sys.exit(main())
