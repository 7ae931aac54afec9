"""Label-free recovery by distillation from the frozen unpruned model (OpenTrans IMP recovery).

The student is the pruned segmentor's image encoder, the teacher a frozen copy of the model before pruning.
No labels are read: any folder of images will do, which keeps pruning semantic-agnostic. The loss is

    L = mean over patches (1 - cos(f_s, f_t)) + pooled_weight * mean over images (1 - cos(e_s, e_t))

with ``f`` the dense patch features ``seg.dense_features(x)`` ``(B, h*w, D)`` and ``e`` the pooled CLIP
embedding ``seg.clip.encode_image(x')`` ``(B, D)``, where ``x'`` is ``x`` bilinearly resized to the tower's
native square input (open_clip's pooled path needs the positional embedding's own grid).

Both models stay in eval mode (BatchNorm running statistics are not updated by small batches); only the
image tower's parameters train, with Adam and a fixed data order seeded per round, so a run is reproducible.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from opentrans.data import images as image_folders
from opentrans.errors import OpenTransError
from opentrans.models.segmentor import OpenVocabSegmentor
from opentrans.prune.imp import Target, refresh_masked
from opentrans.prune.options import check_recovery_options  # noqa: F401 (re-exported)
from opentrans.models.modes import preserved_modes


def open_images(spec: str, image_size: tuple[int, int], mean, std, limit: int | None = None):
    """Images for distillation (:func:`opentrans.data.images.open_images`: ``FORMAT:PATH``, ``images:PATH`` or a
    folder of images): a dataset of float32 ``(3, H, W)`` tensors with ``name`` and ``len``.

    Raises:
        OpenTransError: a path that is not a folder, an empty folder or dataset, a bad ``limit``.
    """
    if limit is not None and limit < 1:
        raise OpenTransError(f"--distill-limit {limit}: must be at least 1")
    return image_folders.open_images(spec, image_size, mean, std, limit=limit, flag="--distill-data")


def _native(seg: OpenVocabSegmentor) -> tuple[int, int]:
    size = seg.visual.image_size
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))


def distill_outputs(seg: OpenVocabSegmentor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dense features (B, h*w, D), pooled embedding (B, D))`` of ``images`` ``(B, 3, H, W)``."""
    dense = seg.dense_features(images)
    native = _native(seg)
    small = images if tuple(images.shape[-2:]) == native else F.interpolate(images, size=native, mode="bilinear",
                                                                           align_corners=False)
    return dense, seg.clip.encode_image(small)


def distill_loss(student: tuple[torch.Tensor, torch.Tensor], teacher: tuple[torch.Tensor, torch.Tensor],
                 pooled_weight: float = 1.0) -> torch.Tensor:
    """``mean(1 - cos)`` over patches of the dense features plus ``pooled_weight`` times ``mean(1 - cos)`` of
    the pooled embeddings (a scalar; 0 when the student reproduces the teacher)."""
    dense = (1 - F.cosine_similarity(student[0], teacher[0], dim=-1)).mean()
    pooled = (1 - F.cosine_similarity(student[1], teacher[1], dim=-1)).mean()
    return dense + pooled_weight * pooled


def _order(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    perm: list[int] = []
    while len(perm) < steps * batch_size:
        perm += torch.randperm(n, generator=gen).tolist()
    return [perm[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


@torch.no_grad()
def evaluate_distill_loss(student: OpenVocabSegmentor, teacher: OpenVocabSegmentor, images: torch.Tensor,
                          targets: list[Target] = (), pooled_weight: float = 1.0) -> float:
    """The distillation loss of ``student`` on a fixed batch ``images`` ``(B, 3, H, W)``."""
    refresh_masked(targets)
    return float(distill_loss(distill_outputs(student, images), distill_outputs(teacher, images), pooled_weight))


class _Student(torch.nn.Module):
    """The student's distillation outputs as one ``forward`` (what DistributedDataParallel wraps)."""

    def __init__(self, seg: OpenVocabSegmentor, targets: list[Target]):
        super().__init__()
        self.seg = seg
        self.targets = list(targets)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        refresh_masked(self.targets)
        return distill_outputs(self.seg, images)


def _world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised default process group, else ``(0, 1)``."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def recover(student: OpenVocabSegmentor, teacher: OpenVocabSegmentor, dataset, steps: int, targets: list[Target],
            batch_size: int = 4, lr: float = 1e-5, seed: int = 0, pooled_weight: float = 1.0) -> list[float]:
    """Train ``student.visual`` for ``steps`` Adam steps to reproduce the frozen ``teacher`` (see module docs).

    Under ``torchrun`` (a default process group is initialised, e.g. ``torch.distributed.init_process_group(
    "gloo")`` on CPU), the student is wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`: every
    process draws the same seeded global batch of ``batch_size`` images and takes its ``rank::world`` share;
    DDP averages the gradients, so the update equals the single-process one on the whole batch.

    Args:
        student: the pruned segmentor; its masked weights (``targets``, reparametrised with
            :func:`~opentrans.prune.imp.attach_masks`) stay zero, the rest of ``student.visual`` trains.
            Its head and text tower are frozen.
        teacher: the frozen reference segmentor (same input size and embedding width).
        dataset: images ``(3, H, W)`` (see :func:`open_images`); cycled in a seeded order.
        steps, batch_size, lr, seed: Adam steps, images per step (global), learning rate, data-order seed.

    Returns:
        The training loss at every step (averaged over processes).

    Raises:
        OpenTransError: under DDP, a ``batch_size`` that is not a multiple of the number of processes.
    """
    if steps == 0:
        return []
    rank, world = _world()
    if batch_size % world:
        raise OpenTransError(f"--batch-size {batch_size} must be a multiple of the {world} processes")
    student.eval()
    teacher.eval()
    params = [p for p in student.visual.parameters()]
    with preserved_modes(student, requires_grad=False):  # only the image tower trains; flags restored after
        for p in params:
            p.requires_grad_(True)
        return _recover_steps(student, teacher, dataset, steps, targets, params, batch_size, lr, seed,
                              pooled_weight, rank, world)


def _recover_steps(student, teacher, dataset, steps, targets, params, batch_size, lr, seed, pooled_weight, rank,
                   world) -> list[float]:
    """The Adam loop of :func:`recover` (the trainable parameters set); masked weights re-zeroed at the end."""
    model = _Student(student, targets)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    optimizer = torch.optim.Adam(params, lr=lr)
    losses = []
    try:
        for idxs in _order(len(dataset), batch_size, steps, seed):
            images = torch.stack([dataset[i] for i in idxs[rank::world]])
            with torch.no_grad():
                target = distill_outputs(teacher, images)
            loss = distill_loss(model(images), target, pooled_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            logged = loss.detach().clone()
            if world > 1:
                torch.distributed.all_reduce(logged)
            losses.append(float(logged) / world)
    finally:
        with torch.no_grad():
            refresh_masked(targets)
    return losses


@torch.no_grad()
def fidelity(student, teacher, dataset, text: torch.Tensor) -> dict:
    """How closely ``student`` reproduces ``teacher`` on ``dataset`` (e.g. CamVid val).

    Returns:
        ``teacher_miou`` (%: mIoU of the student against the teacher's argmax as labels), ``pixel_agreement``
        (%), ``logit_cosine`` (min over images), ``feature_cosine`` (mean over images and patches of the cosine
        of the dense features ``(B, h*w, D)``) and ``images``.
    """
    from opentrans.inference.evaluate import TorchRunner, agreement, batches

    agree = agreement(TorchRunner(teacher), TorchRunner(student), dataset, text.numpy())
    cos, n = 0.0, 0
    for images, _ in batches(dataset):
        c = F.cosine_similarity(student.dense_features(images), teacher.dense_features(images), dim=-1)
        cos, n = cos + float(c.sum()), n + c.numel()
    return {"teacher_miou": agree["teacher_miou"], "pixel_agreement": agree["pixel_agreement"],
            "logit_cosine": agree["cosine"], "feature_cosine": cos / n, "images": len(dataset)}
