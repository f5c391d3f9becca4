"""Ask a TF Serving model exported by `python -m xmdl_tf.export` to segment and explain one EM image.

    python examples/serving_client.py slice.png --url http://localhost:8501/v1/models/xmdl:predict --out results/
    python examples/serving_client.py slice.tif --dry-run --out results/          # write the JSON body only
    python examples/serving_client.py slice.tif --grpc localhost:8500 --out results/  # needs tensorflow-serving-api

Writes `<stem>_mask.tif` (uint8 0/1), `<stem>_gradcam.tif` (float32 in [0, 1])
and `<stem>_probability.tif` (float32). 8-bit images go to the `explain`
signature as uint8; 16-bit images to `explain_float` as float32 raw grey
values (see docs/serving.md). The server normalises and pads the image, so the
client sends raw pixels. Needs numpy, tifffile and opencv (for PNG); not
TensorFlow, except for gRPC.
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

DEFAULT_URL = "http://localhost:8501/v1/models/xmdl:predict"


def read_grey(path: str | Path) -> np.ndarray:
    """A PNG or TIFF as (H, W) uint8 or uint16 grey values (colour is converted to grey)."""
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        image = tifffile.imread(path)
    else:
        import cv2

        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if image is None:
            raise ValueError(f"{path}: cannot read image")
        if image.ndim == 3:
            image = cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2GRAY)
    image = np.squeeze(image)
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        image = (image[..., :3].astype(np.float64) @ [0.299, 0.587, 0.114]).round().astype(image.dtype)
    if image.ndim != 2:
        raise ValueError(f"{path}: expected one grey slice, got an array of shape {image.shape}")
    if image.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"{path}: expected 8- or 16-bit grey values, got {image.dtype}")
    return image


def signature_for(image: np.ndarray, explain: bool = True) -> str:
    """uint8 slices use the uint8 signatures; 16-bit ones the float32 variants (raw grey values)."""
    name = "explain" if explain else "serving_default"
    if image.dtype == np.uint8:
        return name
    return "explain_float" if explain else "serving_float"


def request_body(image: np.ndarray, signature: str = "explain") -> dict:
    """TF Serving REST body (row format) for one (H, W) slice: input `images` of shape [1, H, W, 1]."""
    if image.ndim != 2:
        raise ValueError(f"expected an (H, W) grey slice, got shape {image.shape}")
    return {"signature_name": signature, "instances": [{"images": image[..., None].tolist()}]}


def parse_response(response: dict) -> dict[str, np.ndarray]:
    """TF Serving REST response (row `predictions` or columnar `outputs`) -> arrays with a batch axis.

    For `explain`: probabilities float32 (n, H, W), mask uint8 (n, H, W) 0/1, gradcam float32 (n, H, W)
    in [0, 1] and uncertainty float32 (n, H, W) (entropy, bits, in [0, 1]); `serving_default` has
    the first two only.
    """
    if "error" in response:
        raise RuntimeError(f"TF Serving: {response['error']}")
    if "predictions" in response:
        rows = response["predictions"]
        outputs = {k: [row[k] for row in rows] for k in rows[0]}
    elif "outputs" in response:
        outputs = response["outputs"]
    else:
        raise ValueError(f"not a TF Serving predict response (keys: {sorted(response)})")
    dtypes = {"mask": np.uint8}
    return {k: np.asarray(v, dtypes.get(k, np.float32)) for k, v in outputs.items()}


def post(url: str, body: dict, timeout: float = 300.0) -> dict:
    """POST the body to a TF Serving REST predict URL and return the decoded JSON response."""
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:  # TF Serving explains what went wrong in the body
        detail = err.read().decode(errors="replace")
        raise RuntimeError(f"{url}: HTTP {err.code}: {detail}") from None


def grpc_predict(image: np.ndarray, target: str = "localhost:8500", model_name: str = "xmdl",
                 signature: str = "explain", timeout: float = 300.0) -> dict[str, np.ndarray]:
    """The same request over gRPC (port 8500); needs `pip install tensorflow-serving-api`."""
    try:
        import grpc
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
    except ImportError as err:
        raise SystemExit(f"gRPC needs the optional package tensorflow-serving-api ({err}); "
                         "install it with `pip install tensorflow-serving-api`, or use REST (--url)") from None
    dtype = np.uint8 if signature in ("explain", "serving_default") else np.float32
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(image[None, ..., None].astype(dtype)))
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(target))
    try:
        response = stub.Predict(request, timeout)
    except grpc.RpcError as err:
        raise RuntimeError(f"{target}: gRPC {err.code().name}: {err.details()}") from None
    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


def write_outputs(outputs: dict[str, np.ndarray], out: Path, stem: str) -> list[Path]:
    """Write the first image of each output as `<stem>_mask.tif`, `_gradcam.tif`, `_probability.tif`."""
    import tifffile

    out.mkdir(parents=True, exist_ok=True)
    names = {"mask": "mask", "gradcam": "gradcam", "probabilities": "probability"}
    written = []
    for key, name in names.items():
        if key in outputs:
            path = out / f"{stem}_{name}.tif"
            tifffile.imwrite(path, outputs[key][0], compression="zlib")
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("image", help="PNG or TIFF slice (8- or 16-bit grey)")
    p.add_argument("--url", default=DEFAULT_URL, help="TF Serving REST predict URL")
    p.add_argument("--grpc", default=None, metavar="HOST:PORT", help="use gRPC instead of REST (e.g. localhost:8500)")
    p.add_argument("--model-name", default="xmdl", help="model name for gRPC (REST has it in the URL)")
    p.add_argument("--no-explain", action="store_true", help="mask and probabilities only (serving_default)")
    p.add_argument("--out", default=".", help="folder for the TIFFs (or the JSON body with --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="write the REST request body instead of sending it")
    args = p.parse_args(argv)

    try:
        image = read_grey(args.image)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    signature = signature_for(image, explain=not args.no_explain)
    out, stem = Path(args.out), Path(args.image).stem
    if args.dry_run:
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{stem}_request.json"
        path.write_text(json.dumps(request_body(image, signature)))
        print(f"wrote {path} (POST it to {args.url})")
        return 0
    try:
        if args.grpc:
            outputs = grpc_predict(image, args.grpc, args.model_name, signature)
        else:
            outputs = parse_response(post(args.url, request_body(image, signature)))
    except (OSError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for path in write_outputs(outputs, out, stem):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
