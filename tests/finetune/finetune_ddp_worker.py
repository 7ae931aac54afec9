"""Worker for tests/finetune/test_trainer.py: one tiny-ViT ``finetune_stage`` run, under torchrun (2 processes, gloo, CPU)
or in a single process. Every process logs the files it wrote (each write of the stage ends in the
``os.replace`` of :func:`opentrans.artifacts.atomic_path`) to ``LOG_DIR/writes-rank<R>.json``.

    torchrun --standalone --nproc_per_node 2 tests/finetune/finetune_ddp_worker.py CAMVID_SPEC OUT_DIR LOG_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

#: global batch 2 = one image per process; checkpoints every step (rank 0 writes them)
SETTINGS = {"steps": 2, "batch_size": 2, "lr": 1e-3, "train_limit": 2, "val_limit": 1,
            "checkpoint_every": 1, "freeze_policy": "fraction", "freeze_fraction": 0.75, "seed": 1}


def run(data: str, out: str) -> dict:
    """The stage's figures (``{}`` on a rank other than 0)."""
    from opentrans.finetune.options import FinetuneOptions
    from opentrans.finetune.stage import finetune_stage
    from opentrans.models.source import ModelSource

    return finetune_stage(ModelSource(model="opentrans-tiny-vit"), FinetuneOptions(**SETTINGS), out, data,
                          progress=False)


if __name__ == "__main__":
    data, out, log_dir = sys.argv[1:4]
    written: list[str] = []
    real_replace = os.replace

    def logged_replace(src, dst, *args, **kwargs):
        written.append(str(dst))
        return real_replace(src, dst, *args, **kwargs)

    os.replace = logged_replace
    figures = run(data, out)
    os.replace = real_replace
    rank = os.environ.get("RANK", "0")
    Path(log_dir, f"writes-rank{rank}.json").write_text(json.dumps({"written": written, "figures": figures,
                                                                     "world": os.environ.get("WORLD_SIZE")}))
