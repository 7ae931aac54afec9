#!/usr/bin/env python3
"""OpenTrans Jetson bundle runner: open-vocabulary segmentation with TensorRT engines, no PyTorch.

Copied verbatim into every ``opentrans deploy --target jetson`` bundle as ``runner.py``. Needs numpy and one
back end:

* ``tensorrt`` (default on the device): ``model.engine`` and ``text_encoder.engine`` built by ``build_engine.sh``;
  device memory through ``cuda-python`` (``cuda.bindings.runtime`` or ``cuda.cudart``) or, failing that, PyTorch.
* ``onnxruntime``: the bundle's ONNX files (stand-in where TensorRT is absent; how the build machine tests it).

Commands (run from anywhere; paths are relative to this file)::

    python3 runner.py check [--backend tensorrt|onnxruntime]     # engine outputs vs the manifest's expected ones
    python3 runner.py encode "road,car,sky" --out embeds.npy        # class names -> (C, D) text embeddings
    python3 runner.py segment IMAGES.npy --classes "road,car,sky" --out labels.npy   # (B,3,H,W) normalised -> (B,H,W)

``check`` exits 0 when every figure is within the manifest's tolerances, 1 otherwise, and prints one JSON object.
Other back ends plug in with :func:`register_backend`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
MANIFEST = "bundle.json"
BACKENDS: dict[str, Callable[[str], Callable[[dict], dict]]] = {}


def register_backend(name: str):
    """Decorator: ``factory(model_path_without_suffix) -> run(feeds: dict[str, ndarray]) -> dict[str, ndarray]``."""

    def deco(factory):
        BACKENDS[name] = factory
        return factory

    return deco


@register_backend("onnxruntime")
def _onnxruntime(stem: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(stem + ".onnx", opts, providers=ort.get_available_providers())
    names = [o.name for o in session.get_outputs()]
    return lambda feeds: dict(zip(names, session.run(names, feeds)))


class _CudaMemory:
    """Host<->device copies with cuda-python, or PyTorch CUDA tensors as a fallback."""

    def __init__(self):
        self.rt = None
        for mod in ("cuda.bindings.runtime", "cuda.cudart"):
            try:
                self.rt = __import__(mod, fromlist=["cudaMalloc"])
                break
            except ImportError:
                continue
        if self.rt is None:
            import torch  # noqa: F401 - fallback

    def _check(self, result):
        err = result[0] if isinstance(result, tuple) else result
        if int(err) != 0:
            raise RuntimeError(f"CUDA error {err}")
        return result[1] if isinstance(result, tuple) and len(result) > 1 else None

    def to_device(self, array: np.ndarray):
        if self.rt is None:
            import torch

            return torch.from_numpy(np.ascontiguousarray(array)).cuda()
        ptr = self._check(self.rt.cudaMalloc(array.nbytes))
        self._check(self.rt.cudaMemcpy(ptr, array.ctypes.data, array.nbytes,
                                       self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice))
        return ptr

    def empty(self, shape, dtype):
        if self.rt is None:
            import torch

            return torch.empty(tuple(shape), dtype={np.float32: torch.float32, np.float16: torch.float16}[dtype],
                               device="cuda")
        return self._check(self.rt.cudaMalloc(int(np.prod(shape)) * np.dtype(dtype).itemsize))

    def address(self, buf) -> int:
        return int(buf.data_ptr()) if hasattr(buf, "data_ptr") else int(buf)

    def to_host(self, buf, shape, dtype) -> np.ndarray:
        if hasattr(buf, "cpu"):
            return buf.cpu().numpy()
        out = np.empty(shape, dtype=dtype)
        self._check(self.rt.cudaMemcpy(out.ctypes.data, buf, out.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost))
        return out

    def free(self, buf) -> None:
        if self.rt is not None and not hasattr(buf, "cpu"):
            self.rt.cudaFree(buf)


@register_backend("tensorrt")
def _tensorrt(stem: str):
    """TensorRT 8.5-11 named-tensor API (``execute_async_v3``). Not exercised on the build machine (no GPU)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    if not os.path.exists(stem + ".engine"):
        raise SystemExit(f"{stem}.engine not found: build the engines first with ./build_engine.sh")
    with open(stem + ".engine", "rb") as fh:
        engine = trt.Runtime(logger).deserialize_cuda_engine(fh.read())
    if engine is None:
        raise SystemExit(f"{stem}.engine: TensorRT cannot load it (built on another GPU/TensorRT? run build_engine.sh)")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    mem = _CudaMemory()

    def run(feeds: dict) -> dict:
        bufs = []
        try:
            for name, array in feeds.items():
                dtype = trt.nptype(engine.get_tensor_dtype(name))
                array = np.ascontiguousarray(array, dtype=dtype)
                buf = mem.to_device(array)
                bufs.append(buf)
                context.set_input_shape(name, tuple(array.shape))
                context.set_tensor_address(name, mem.address(buf))
            shapes = {}
            for name in outputs:
                shapes[name] = tuple(context.get_tensor_shape(name))
                buf = mem.empty(shapes[name], trt.nptype(engine.get_tensor_dtype(name)))
                bufs.append(buf)
                context.set_tensor_address(name, mem.address(buf))
            if not context.execute_async_v3(0):
                raise RuntimeError("TensorRT execution failed")
            if mem.rt is not None:
                mem.rt.cudaDeviceSynchronize()
            else:
                import torch

                torch.cuda.synchronize()
            start = len(feeds)
            return {name: mem.to_host(bufs[start + i], shapes[name], trt.nptype(engine.get_tensor_dtype(name)))
                    for i, name in enumerate(outputs)}
        finally:
            for buf in bufs:
                mem.free(buf)

    return run


def _load_tokenizer(manifest: dict):
    sys.path.insert(0, HERE)
    from tokenizer import ClipTokenizer  # the bundle's standalone CLIP BPE tokenizer

    text = manifest["text_encoder"]
    return ClipTokenizer(os.path.join(HERE, text["bpe"]), int(text["context_length"]))


class Bundle:
    """The bundle's image and text graphs on one back end.

    Args:
        backend: a :data:`BACKENDS` name.
        root: the bundle directory.
    """

    def __init__(self, backend: str = "tensorrt", root: str = HERE):
        self.root = root
        with open(os.path.join(root, MANIFEST)) as fh:
            self.manifest = json.load(fh)
        if backend not in BACKENDS:
            raise SystemExit(f"--backend {backend}: choose {', '.join(BACKENDS)}")
        self.backend = backend
        graph = self.manifest["image_graph"][backend]
        try:
            self._image = BACKENDS[backend](os.path.join(root, graph))
            self._text = BACKENDS[backend](os.path.join(root, self.manifest["text_encoder"][backend]))
        except ImportError as exc:
            raise SystemExit(f"--backend {backend}: {exc} (install it, or try --backend onnxruntime)") from None
        self.tokenizer = _load_tokenizer(self.manifest)
        self.templates = list(self.manifest["text_encoder"]["templates"])

    def encode_tokens(self, ids: np.ndarray) -> np.ndarray:
        """Per-prompt embeddings float32 (N, D), L2-normalised, for token ids int64 (N, L)."""
        batch = int(self.manifest["text_encoder"].get("max_prompts", 512))
        outs = [self._text({"input_ids": ids[i:i + batch].astype(np.int64)})["text_embeds"]
                for i in range(0, len(ids), batch)]
        return np.concatenate(outs).astype(np.float32)

    def encode_classes(self, names: list[str]) -> np.ndarray:
        """Class embeddings float32 (C, D), L2-normalised: mean over the templates, renormalised."""
        prompts = [t.format(n) for n in names for t in self.templates]
        emb = self.encode_tokens(self.tokenizer(prompts)).reshape(len(names), len(self.templates), -1).mean(1)
        return (emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)).astype(np.float32)

    def logits(self, images: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
        """Logits float32 (B, C, H, W) for normalised images float32 (B, 3, H, W) and text_embeds (C, D)."""
        out = self._image({"images": np.ascontiguousarray(images, np.float32),
                           "text_embeds": np.ascontiguousarray(text_embeds, np.float32)})["logits"]
        return np.asarray(out, dtype=np.float32)


def compare(expected: np.ndarray, got: np.ndarray, tolerances: dict, class_axis: int | None = 1,
            decided_margin: float | None = None) -> dict:
    """Figures of ``got`` against ``expected`` and whether they meet ``tolerances``.

    Args:
        expected, got: arrays of one shape (logits (B,C,H,W) or embeddings (C,D)).
        tolerances: ``{figure: [op, bound]}`` with op ``<=`` or ``>=``; figures ``max_abs_diff``, ``cosine``
            (of the flattened arrays, min over the first axis), ``pixel_agreement`` (% equal argmax over
            ``class_axis``; skipped when ``class_axis`` is None) and ``decided_agreement`` (% equal argmax over the
            pixels whose expected top-1 logit leads top-2 by ``decided_margin`` or more; not gated where under 1 %
            of the pixels are decided).

    Returns:
        ``{"max_abs_diff", "cosine", ["pixel_agreement", "decided_agreement"], "failures": [...], "passed": bool}``.
    """
    expected = np.asarray(expected, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    if expected.shape != got.shape:
        return {"failures": [f"shape {list(got.shape)} != expected {list(expected.shape)}"], "passed": False}
    e, g = expected.reshape(len(expected), -1), got.reshape(len(got), -1)
    cos = (e * g).sum(1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(g, axis=1) + 1e-12)
    figures = {"max_abs_diff": float(np.abs(expected - got).max()), "cosine": float(cos.min())}
    if class_axis is not None:
        same = expected.argmax(class_axis) == got.argmax(class_axis)
        figures["pixel_agreement"] = 100.0 * float(same.mean())
        if decided_margin is not None:
            top2 = np.partition(expected, -2, axis=class_axis)
            gap = np.take(top2, -1, axis=class_axis) - np.take(top2, -2, axis=class_axis)
            decided = gap >= decided_margin
            figures["decided_agreement"] = (100.0 * float(same[decided].mean()) if decided.mean() >= 0.01
                                            else None)
    failures = []
    for key, (op, bound) in tolerances.items():
        if figures.get(key) is None:  # not computed here (text), or too few decided pixels
            continue
        value = figures[key]
        if not (value <= bound if op == "<=" else value >= bound):
            failures.append(f"{key} {value:.6g} {'>' if op == '<=' else '<'} {bound:g}")
    return {**figures, "failures": failures, "passed": not failures}


def check(bundle: Bundle) -> dict:
    """Run the manifest's sample through ``bundle`` and compare with the expected outputs (PyTorch fp32).

    Checks: the tokenizer's ids for the sample prompts; the text graph's class embeddings; the image graph's logits
    for the sample image, with the expected class embeddings as input (so the image check is independent of the
    text check).
    """
    m = bundle.manifest
    s = m["sample"]
    load = lambda key: np.load(os.path.join(bundle.root, s[key]))
    names = list(s["class_names"])
    report = {"backend": bundle.backend, "precision": m["precision"]}
    ids = bundle.tokenizer([t.format(n) for n in names for t in bundle.templates])
    report["tokens_equal"] = bool(np.array_equal(ids, load("prompt_ids")))
    report["text"] = compare(load("text_embeds"), bundle.encode_classes(names), m["tolerances"]["text"], None)
    logits = bundle.logits(load("images"), load("text_embeds"))
    report["image"] = compare(load("logits"), logits, m["tolerances"]["image"][m["precision"]],
                              decided_margin=s.get("decided_margin"))
    report["passed"] = bool(report["tokens_equal"] and report["text"]["passed"] and report["image"]["passed"])
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("check", "encode", "segment"):
        p = sub.add_parser(name)
        p.add_argument("--backend", default="tensorrt", help=f"one of {', '.join(BACKENDS)}")
        if name == "encode":
            p.add_argument("classes", help="comma-separated class names")
        if name == "segment":
            p.add_argument("images", help=".npy float32 (B,3,H,W), normalised like the bundle's sample")
            p.add_argument("--classes", required=True, help="comma-separated class names")
        if name != "check":
            p.add_argument("--out", required=True, help="output .npy")
    args = parser.parse_args(argv)
    bundle = Bundle(args.backend)
    if args.command == "check":
        report = check(bundle)
        print(json.dumps(report))
        return 0 if report["passed"] else 1
    names = [c.strip() for c in args.classes.split(",") if c.strip()]
    if not names:
        raise SystemExit("no class names given")
    embeds = bundle.encode_classes(names)
    if args.command == "encode":
        np.save(args.out, embeds)
    else:
        np.save(args.out, bundle.logits(np.load(args.images), embeds).argmax(1).astype(np.int32))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
