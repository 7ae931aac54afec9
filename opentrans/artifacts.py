"""Run directories, atomic writes and stage manifests.

Every stage writes into its own directory and finishes by writing ``manifest.json``: what it read
(with sha256), what it wrote, the options, package versions, wall time and headline figures. A stage
directory counts as finished only when its manifest exists with ``"status": "complete"``; every file is
written to a temporary name first and renamed into place, so an interrupted run never leaves a
half-written artifact under its final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from opentrans.errors import OpenTransError

MANIFEST = "manifest.json"
_VERSIONED_PACKAGES = (
    "opentrans", "torch", "open_clip_torch", "torch-pruning", "weightwatcher", "onnx",
    "onnxruntime", "openvino", "nncf", "safetensors", "numpy",
)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary file keeps ``path``'s suffix (some writers, e.g. OpenVINO or matplotlib, choose the
    format from it). On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (NaN written as null)."""
    return write_text(path, json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; raise :class:`OpenTransError` naming the file if it is missing or invalid."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise OpenTransError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise OpenTransError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and obj != obj:  # NaN
        return None
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _jsonable(obj.item())
    return obj


def sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    """Installed versions of the packages whose behaviour a manifest's figures depend on."""
    versions = {}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    versions["python"] = platform.python_version()
    return versions


def machine_description() -> dict[str, Any]:
    """CPU model, its ISA (:meth:`opentrans.hardware.CpuIsa.to_json`: flags, VNNI, native bf16, AMX), logical core
    count and torch thread count: recorded in every manifest and bench header next to the figures."""
    import torch

    from opentrans.hardware import cpu_isa

    return {**cpu_isa().to_json(), "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def is_complete(stage_dir: str | os.PathLike) -> bool:
    """True when ``stage_dir`` holds a manifest with status ``complete``."""
    path = Path(stage_dir) / MANIFEST
    if not path.exists():
        return False
    return read_json(path).get("status") == "complete"


def load_manifest(stage_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a finished stage directory.

    Raises:
        OpenTransError: the directory has no manifest, or its stage did not finish.
    """
    stage_dir = Path(stage_dir)
    if not (stage_dir / MANIFEST).exists():
        raise OpenTransError(f"{stage_dir}: no {MANIFEST}; is this the output directory of an opentrans stage?")
    manifest = read_json(stage_dir / MANIFEST)
    if manifest.get("status") != "complete":
        raise OpenTransError(f"{stage_dir}: stage '{manifest.get('stage')}' did not finish; run it again")
    return manifest


class StageRecord:
    """Collects what one stage read and wrote, then writes its manifest.

    Use as a context manager; the manifest is written (status ``complete``) only if the block succeeds.
    ``started`` (a ``time.perf_counter()`` value) makes the recorded wall time include work done before the
    record was opened (validation, analysis)::

        with StageRecord("prune", out_dir, options) as rec:
            rec.add_input(path)
            ...
            rec.add_output(path)
            rec.figures["params_m"] = 57.9
    """

    def __init__(self, stage: str, out_dir: str | os.PathLike, options: dict[str, Any], started: float | None = None):
        self.stage = stage
        self.out_dir = Path(out_dir)
        self.options = options
        self.inputs: list[dict[str, str]] = []
        self.outputs: list[dict[str, str]] = []
        self.figures: dict[str, Any] = {}
        self.weights: str | None = None
        self._start = started  # time.perf_counter() when the stage began, if before the record was opened

    def __enter__(self) -> StageRecord:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stale = self.out_dir / MANIFEST
        if stale.exists():
            stale.unlink()  # a rerun invalidates the old record until it finishes
        if self._start is None:
            self._start = time.perf_counter()
        return self

    def add_input(self, path: str | os.PathLike) -> None:
        """Record an input file with its sha256."""
        self.inputs.append({"path": str(path), "sha256": sha256(path)})

    def add_output(self, path: str | os.PathLike) -> None:
        """Record an output file (relative to the stage directory when inside it) with its sha256."""
        path = Path(path)
        rel = path.relative_to(self.out_dir) if path.is_relative_to(self.out_dir) else path
        self.outputs.append({"path": str(rel), "sha256": sha256(path)})

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            return
        wall = time.perf_counter() - self._start
        write_json(
            self.out_dir / MANIFEST,
            {
                "stage": self.stage,
                "status": "complete",
                "weights": self.weights,
                "options": self.options,
                "inputs": self.inputs,
                "outputs": self.outputs,
                "figures": self.figures,
                "wall_time_s": round(wall, 2),
                "versions": package_versions(),
                "machine": machine_description(),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )
