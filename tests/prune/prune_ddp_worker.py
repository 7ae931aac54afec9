"""Worker for tests/prune/test_prune_imp.py: one IMP round plus distillation recovery of the tiny ViT, under torchrun
(gloo, CPU) or in a single process. Writes the recovered image tower (safetensors) to argv[2] from rank 0.

    torchrun --standalone --nproc_per_node 2 tests/prune/prune_ddp_worker.py CAMVID_SPEC OUT.safetensors [STAGE_DIR]

With STAGE_DIR, every rank then runs the whole ``imp_stage`` (one round, one recovery step) into STAGE_DIR: only
rank 0 may write there; each rank appends the figures it got back to STAGE_DIR/../figures_rank{R}.json.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
from safetensors.torch import save_file

from opentrans.models.artifact import build_segmentor
from opentrans.prune.distill import open_images, recover
from opentrans.prune.imp import attach_masks, bake_masks, current_masks, global_magnitude_round

STEPS, BATCH = 2, 2


def run(data: str) -> tuple[dict, list[float]]:
    """(image-tower state after one 10 % round and recovery, training losses)."""
    seg, spec = build_segmentor("opentrans-tiny-vit", "none")
    teacher = copy.deepcopy(seg).requires_grad_(False)
    masks = current_masks(seg.visual, "extended")  # a ViT: our extended targets (the authors' have none)
    targets = attach_masks(seg.visual, masks)
    global_magnitude_round(targets, sum(m.numel() for m in masks.values()) // 10)
    images = open_images(data, spec.image_size, spec.mean, spec.std, limit=4)
    losses = recover(seg, teacher, images, STEPS, targets, batch_size=BATCH, lr=1e-5, seed=0)
    bake_masks(targets)
    return {k: v.detach().contiguous() for k, v in seg.visual.state_dict().items()}, losses


if __name__ == "__main__":
    torch.distributed.init_process_group("gloo")
    state, losses = run(sys.argv[1])
    if torch.distributed.get_rank() == 0:
        save_file(state, sys.argv[2], metadata={"losses": ",".join(map(repr, losses)),
                                                "world": os.environ["WORLD_SIZE"]})
    if len(sys.argv) > 3:
        import json
        from pathlib import Path

        from opentrans.models.source import ModelSource
        from opentrans.prune.imp_stage import imp_stage
        from opentrans.prune.options import ImpOptions

        stage_dir = Path(sys.argv[3])
        figures = imp_stage(ModelSource(model="opentrans-tiny-vit"),
                            ImpOptions(sparsity=0.1, recovery_steps=1, distill_data=sys.argv[1], distill_limit=2,
                                       batch_size=2, imp_targets="extended"), stage_dir)
        rank = torch.distributed.get_rank()
        (stage_dir.parent / f"figures_rank{rank}.json").write_text(json.dumps(figures))
    torch.distributed.destroy_process_group()
