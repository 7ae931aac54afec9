"""Untrusted input at the command line: checkpoints, artifacts, images, text files and option values that come
from anyone. Each probe checks the exit status, a one-line ``Error:`` message, and that nothing was written or
damaged."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from opentrans.cli import cli
from tests.conftest import CAMVID_SPEC, TINY_VIT


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line_error(result, *fragments, exit_code=1):
    """``result`` exited with ``exit_code`` and printed one ``Error:`` line holding every fragment."""
    assert result.exit_code == exit_code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    text = result.output.strip()
    assert text.count("\n") == 0 and text.startswith("Error:"), text
    for fragment in fragments:
        assert fragment in text, text


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes (to show nothing changed)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# --- 1. checkpoints are never unpickled by default ------------------------------------------------------------

class Evil:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".pth"])
def test_pickled_checkpoint_is_refused(tmp_path, monkeypatch, suffix):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED"
    evil = tmp_path / f"evil{suffix}"
    torch.save({"state_dict": Evil(marker)}, evil)
    result = invoke("eval", "--model", TINY_VIT, "--pretrained", evil, "--data", CAMVID_SPEC, "--limit", 1)
    assert_one_line_error(result, str(evil), "--allow-pickle", "pickled")
    assert not marker.exists()
    out = tmp_path / "prune"
    result = invoke("prune", "--model", TINY_VIT, "--pretrained", evil, "--sparsity", 0.5, "--out", out)
    assert_one_line_error(result, "--allow-pickle")
    assert not marker.exists() and not out.exists()


def test_allow_pickle_is_on_every_verb_with_pretrained_and_says_the_risk():
    for verb in ("analyze", "prune", "finetune", "deploy", "eval", "segment"):
        result = invoke(verb, "--help")
        assert result.exit_code == 0 and "--allow-pickle" in result.output, verb
        assert "runs any code" in " ".join(result.output.split()), verb


def test_checkpoints_that_need_no_pickle_load(tmp_path):
    from safetensors.torch import save_file

    from opentrans.models.clip import create_architecture, load_clip, pickle_allowed

    model = create_architecture(TINY_VIT, seed=3)
    state = model.state_dict()
    plain, wrapped, safe, traced = (tmp_path / n for n in ("plain.pt", "wrapped.bin", "w.safetensors", "openai.pt"))
    torch.save(state, plain)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, wrapped)
    save_file({k: v.contiguous() for k, v in state.items()}, str(safe))
    image = torch.randn(1, 3, *model.visual.image_size)
    with pytest.warns(Warning):  # torch.jit.trace's deprecation and tracer notices
        torch.jit.trace(model, (image, torch.zeros(1, 77, dtype=torch.long)), strict=False, check_trace=False).save(traced)
    for path in (plain, wrapped, safe, traced):
        loaded = load_clip(TINY_VIT, str(path))
        assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in state.items()), path
    # a training checkpoint that pickles its argparse options: refused, loaded with --allow-pickle
    with_args = tmp_path / "with_args.pt"
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=0.1)}, with_args)
    from opentrans.errors import OpenTransError

    with pytest.raises(OpenTransError, match="--allow-pickle"):
        load_clip(TINY_VIT, str(with_args))
    with pickle_allowed(True):
        loaded = load_clip(TINY_VIT, str(with_args))
    assert torch.equal(loaded.model.state_dict()["logit_scale"], state["logit_scale"])


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04truncated zip"])
def test_garbage_checkpoint_is_one_line(tmp_path, content):
    for name in ("bad.pt", "bad.safetensors", "bad.bin"):
        path = tmp_path / name
        path.write_bytes(content)
        result = invoke("eval", "--model", TINY_VIT, "--pretrained", path, "--data", CAMVID_SPEC, "--limit", 1)
        assert_one_line_error(result, str(path))
