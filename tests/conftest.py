"""Shared fixtures: the real CamVid data beside the project, and tiny random-initialised models.

Tests that read the real data (``../shared/data``, or ``OPENTRANS_DATA``) carry the ``real_data`` marker (tests
that use the ``camvid_spec``/``camvid_val`` fixtures get it automatically). Without the data those tests are
skipped with the reason shown; ``pytest -m "not real_data"`` runs the unit tier alone, anywhere.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__import__("os").environ.get("OPENTRANS_DATA", ROOT.parent / "shared" / "data"))
CAMVID = SHARED_DATA / "camvid"
COCO_OBJECT = SHARED_DATA / "coco-object-mini"
CAMVID_SPEC = f"camvid:{CAMVID}"
TINY_VIT = "opentrans-tiny-vit"
TINY_RN = "opentrans-tiny-rn"


HAVE_REAL_DATA = (CAMVID / "val.txt").exists() and COCO_OBJECT.is_dir()
_DATA_FIXTURES = {"camvid_spec", "camvid_val"}

#: Mark a test (or ``pytestmark = real_data`` a module) that reads CamVid or COCO-Object mini.
real_data = pytest.mark.real_data


def pytest_configure(config):
    config.addinivalue_line("markers", "real_data: reads the shared CamVid / COCO-Object mini data "
                                       "(../shared/data or OPENTRANS_DATA); skipped where it is missing")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _DATA_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(real_data)
    if HAVE_REAL_DATA:
        return
    skip = pytest.mark.skip(reason=f"needs the shared data, not found at {SHARED_DATA} (set OPENTRANS_DATA)")
    for item in items:
        if "real_data" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same global torch RNG state, so a test's random draws (module inits that take no
    seed) do not depend on which tests ran before it."""
    import torch

    torch.manual_seed(0)


@pytest.fixture(scope="session")
def camvid_spec() -> str:
    return CAMVID_SPEC


@pytest.fixture()
def tiny_vit():
    from opentrans.models.artifact import build_segmentor

    return build_segmentor(TINY_VIT, "none")


@pytest.fixture()
def tiny_rn():
    from opentrans.models.artifact import build_segmentor

    return build_segmentor(TINY_RN, "none")


@pytest.fixture()
def camvid_val(tiny_vit):
    from opentrans.data import open_dataset

    _, spec = tiny_vit
    return open_dataset(CAMVID_SPEC, "val", spec.image_size, spec.mean, spec.std, limit=4)


def skip_where_tensorrt_exists() -> None:
    """Skip the calling test on a machine where TensorRT imports (it checks the error for machines without it)."""
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):
        return
    pytest.skip("checks the error for machines without TensorRT, and TensorRT is installed here")


def fake_trtexec(tmp_path: Path, version_tag: str) -> Path:
    """A stand-in ``trtexec`` that reports TensorRT ``version_tag`` on ``--help`` and appends the arguments of every
    other call to ``args-<version_tag>.txt`` beside it (each call ends with a ``--`` line)."""
    exe = tmp_path / f"trtexec-{version_tag}"
    exe.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        if [ "$1" = "--help" ]; then echo "&&&& RUNNING TensorRT.trtexec [TensorRT {version_tag}] # trtexec --help"; exit 0; fi
        printf '%s\\n' "$@" >> "$(dirname "$0")/args-{version_tag}.txt"
        echo "--" >> "$(dirname "$0")/args-{version_tag}.txt"
        """))
    exe.chmod(0o755)
    return exe


def save_finished(seg, spec, out_dir: Path) -> Path:
    """Save a segmentor as the output of a finished stage (model files plus a complete manifest.json recording their
    sha256), what ``--from`` and ``load_runner`` accept; returns ``out_dir``."""
    from opentrans.artifacts import StageRecord
    from opentrans.models.artifact import SPEC_FILE, save_segmentor

    with StageRecord("test", out_dir, {}) as rec:
        rec.add_output(save_segmentor(seg, spec, out_dir))
        rec.add_output(Path(out_dir) / SPEC_FILE)
        rec.weights = spec.weights
    return Path(out_dir)
