"""Run directories, atomic writes and stage manifests.

Every stage writes into its own directory and finishes by writing ``manifest.json``: what it read
(with sha256), what it wrote, the options, package versions, wall time and headline figures. A stage
directory counts as finished only when its manifest exists with ``"status": "complete"``; every file is
written to a temporary name first and renamed into place, so an interrupted run never leaves a
half-written artifact under its final name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from opentrans import validate
from opentrans.errors import OpenTransError

MANIFEST = "manifest.json"
_VERSIONED_PACKAGES = (
    "opentrans", "torch", "open_clip_torch", "torch-pruning", "weightwatcher", "onnx",
    "onnxruntime", "openvino", "nncf", "safetensors", "numpy",
)


#: errno values that mean "this cannot be written here" (a full disk, a read-only or foreign location, a path
#: through a file): the CLI reports them as one line, ``<strerror>: PATH``.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
                          errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG})


def os_error_message(exc: OSError, path: str | os.PathLike | None = None) -> str | None:
    """``"no space left on device: PATH"`` for an OSError whose errno is in :data:`WRITE_ERRNOS` (``path`` or the
    error's own file name), None for any other error (which should propagate as it is)."""
    if exc.errno not in WRITE_ERRNOS:
        return None
    where = path if path is not None else (exc.filename if exc.filename is not None else "(file name unknown)")
    return f"{os.strerror(exc.errno)[:1].lower()}{os.strerror(exc.errno)[1:]}: {where}"


def check_writable(path: str | os.PathLike, flag: str = "--out") -> None:
    """Refuse, before any work, an output file that cannot be written: ``path`` is a directory, or its nearest
    existing ancestor is not a directory or does not take a new file (read-only, no permission, full). A
    temporary file is created there and removed at once; nothing else is written.

    Raises:
        OpenTransError: one line naming ``flag`` and ``path``.
    """
    path = Path(path)
    if path.is_dir():
        raise OpenTransError(f"{flag} {path}: is a directory; give a file name")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OpenTransError(f"{flag} {path}: {ancestor} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as exc:
        message = os_error_message(exc, ancestor)
        if message is None:
            raise
        raise OpenTransError(f"{flag} {path}: cannot write there ({message})") from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary file keeps ``path``'s suffix (some writers, e.g. OpenVINO or matplotlib, choose the
    format from it). On an exception the temporary file is removed and ``path`` is left untouched.

    Raises:
        OpenTransError: ``"no space left on device: PATH"`` and the like when the write or the rename fails for
            lack of space, permission or a path through a file (:data:`WRITE_ERRNOS`).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    except OSError as exc:
        message = os_error_message(exc, path)
        if message is None:
            raise
        raise OpenTransError(message) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as exc:
        message = os_error_message(exc, path)
        if message is None:
            raise
        raise OpenTransError(message) from None
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


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` as a safetensors file atomically, byte-identical for identical input.

    safetensors stores the metadata in a hash map whose order changes from process to process, so two saves of the
    same tensors could differ in bytes (and sha256); the header's metadata is rewritten here in sorted key order,
    in place and at the same length.
    """
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        if metadata:
            with open(tmp, "r+b") as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(size))
                header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
                text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
                if len(text) > size:
                    raise RuntimeError(f"{path}: canonical safetensors header is longer than the written one")
                fh.seek(8)
                fh.write(text.ljust(size, b" "))
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file (NaN and infinities are not JSON and are refused).

    Raises:
        OpenTransError: naming the file, if it is missing, unreadable, not UTF-8 or not valid JSON.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except FileNotFoundError:
        raise OpenTransError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise OpenTransError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise OpenTransError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except ValueError as exc:  # from _no_constant
        raise OpenTransError(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise OpenTransError(f"{path}: cannot read it ({exc.strerror or exc.__class__.__name__})") from None


def read_text(path: str | os.PathLike, what: str = "text file") -> str:
    """A user's text file (class names, split lists, prompt sets, templates, recipes) as UTF-8.

    Raises:
        OpenTransError: one line naming the file: missing, a directory, unreadable, or not UTF-8 (with the
            offending line and byte, and what to do).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise OpenTransError(f"{path}: file not found") from None
    except OSError as exc:
        raise OpenTransError(f"{path}: cannot read it ({exc.strerror or exc.__class__.__name__})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise OpenTransError(f"{path}: {what} is not UTF-8 (line {line}, byte 0x{data[exc.start]:02x}); save it as "
                             f"UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


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
    manifest = read_json(path)
    return isinstance(manifest, dict) and manifest.get("status") == "complete"


def load_manifest(stage_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a finished stage directory.

    Raises:
        OpenTransError: the directory has no manifest, or its stage did not finish.
    """
    stage_dir = Path(stage_dir)
    if not (stage_dir / MANIFEST).exists():
        raise OpenTransError(f"{stage_dir}: no {MANIFEST}; is this the output directory of an opentrans stage "
                             f"that finished?")
    where = str(stage_dir / MANIFEST)
    manifest = validate.mapping(read_json(stage_dir / MANIFEST), where, required=("stage", "status"), optional=None)
    if manifest.get("status") != "complete":
        raise OpenTransError(f"{stage_dir}: stage '{manifest.get('stage')}' did not finish; run it again")
    for i, entry in enumerate(validate.sequence(manifest.get("outputs", []), f"{where}: outputs")):
        entry = validate.mapping(entry, f"{where}: outputs[{i}]", required=("path", "sha256"), optional=None)
        validate.string(entry["path"], f"{where}: outputs[{i}].path")
        digest = validate.string(entry["sha256"], f"{where}: outputs[{i}].sha256")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise OpenTransError(f"{where}: outputs[{i}].sha256 is not a sha256 hex digest")
    if not isinstance(manifest.get("figures", {}), dict):
        raise OpenTransError(f"{where}: figures: expected an object")
    return manifest


def verify_outputs(stage_dir: str | os.PathLike, names: list[str]) -> dict[str, Any]:
    """The manifest of the finished stage in ``stage_dir``, after checking that each of ``names`` (paths
    relative to ``stage_dir``) is an output the stage recorded and still has the sha256 it recorded.

    Raises:
        OpenTransError: no complete manifest (an unfinished or foreign directory), a file the manifest does not
            list, a missing file, or one whose bytes changed since the stage wrote it (damaged, truncated, edited).
    """
    stage_dir = Path(stage_dir)
    manifest = load_manifest(stage_dir)
    recorded = {str(Path(o["path"])): o["sha256"] for o in manifest.get("outputs", [])}
    for name in names:
        path = stage_dir / name
        digest = recorded.get(str(Path(name)))
        if digest is None:
            raise OpenTransError(f"{path}: not among the outputs its stage recorded in {stage_dir / MANIFEST}")
        if not path.is_file():
            raise OpenTransError(f"{path}: file not found (recorded in {stage_dir / MANIFEST})")
        if sha256(path) != digest:
            raise OpenTransError(f"{path}: its sha256 differs from the one recorded in {stage_dir / MANIFEST} when "
                                 f"the stage wrote it (damaged, truncated or edited since); rerun that stage")
    return manifest


def foreign_files(stage_dir: str | os.PathLike) -> list[str]:
    """Files under ``stage_dir`` (relative names) that its finished stage did not record as outputs (besides
    ``manifest.json``): what a user added, and what replacing the directory would delete.

    Raises:
        OpenTransError: no complete manifest (see :func:`load_manifest`).
    """
    stage_dir = Path(stage_dir)
    owned = {MANIFEST} | {str(Path(o["path"])) for o in load_manifest(stage_dir).get("outputs", [])}
    return sorted(str(p.relative_to(stage_dir)) for p in stage_dir.rglob("*")
                  if (p.is_file() or p.is_symlink()) and str(p.relative_to(stage_dir)) not in owned)


def check_replaceable(out_dir: str | os.PathLike, flag: str = "--out") -> None:
    """Refuse an output directory that a new stage run may not replace as a whole: anything but an absent or empty
    directory, or the output of a finished stage that holds only the files it recorded.

    Raises:
        OpenTransError: ``out_dir`` is a file, a non-empty directory without a complete manifest, or one holding
            files its stage did not write (they would be deleted).
    """
    out_dir = Path(out_dir)
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not out_dir.is_dir():
        raise OpenTransError(f"{flag} {out_dir}: exists and is not a directory")
    if not any(out_dir.iterdir()):
        return
    if not is_complete(out_dir):
        raise OpenTransError(f"{flag} {out_dir}: exists, is not empty and is not the output of a finished opentrans "
                             f"stage; choose another directory")
    foreign = foreign_files(out_dir)
    if foreign:
        raise OpenTransError(f"{flag} {out_dir}: holds {len(foreign)} file(s) its earlier run did not write (e.g. "
                             f"{foreign[0]}), which replacing it would delete; move them or choose another directory")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_staging_dir(out_dir: Path, suffix: str) -> Path:
    """A new directory ``.NAME.PID.XXXX<suffix>`` beside ``out_dir`` for a stage to build in, after removing the
    ones of the same name and suffix that a process no longer running left behind (killed before its cleanup).
    Directories of running processes (a concurrent run) and of the older ``.NAME.XXXX<suffix>`` form are kept."""
    for stale in out_dir.parent.glob(f".{out_dir.name}.*{suffix}"):
        pid = stale.name[len(out_dir.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)) and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{os.getpid()}.", suffix=suffix, dir=out_dir.parent))


@contextlib.contextmanager
def staged_dir(out_dir: str | os.PathLike, flag: str = "--out") -> Iterator[Path]:
    """Yield a fresh directory beside ``out_dir`` for a stage to write into; only when the block succeeds is it
    renamed onto ``out_dir`` (an earlier finished run there is renamed aside first and removed after). A failed
    run, e.g. on a full disk, leaves ``out_dir`` exactly as it was and removes its own directory.

    The directory is ``.NAME.PID.*.stage-tmp``; ones left by a process that no longer runs (killed) are removed
    first.

    Raises:
        OpenTransError: ``out_dir`` may not be replaced (see :func:`check_replaceable`).
    """
    out_dir = Path(out_dir)
    check_replaceable(out_dir, flag)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = make_staging_dir(out_dir, ".stage-tmp")
    try:
        yield work
        if out_dir.exists():
            check_replaceable(out_dir, flag)  # nothing was added meanwhile
            old = work.with_name(work.name + ".old")
            os.replace(out_dir, old)
            os.replace(work, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(work, out_dir)
    finally:
        if work.exists():
            shutil.rmtree(work)


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
