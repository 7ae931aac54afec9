"""A small, deterministic CPU training loop for the open-vocabulary segmentor.

Pixel-wise cross-entropy between the segmentor's logits ``(B, C, H, W)`` (CLIP's logit scale times the
cosine of each patch feature with each class text embedding, upsampled to the input size) and the label
masks, resized with nearest-neighbour interpolation to the network input size ``(H, W)``. AdamW over the
parameters with ``requires_grad`` (set them with :func:`opentrans.finetune.freeze.apply_freeze_plan`), with
the "poly" learning-rate schedule of DeepLab (Chen et al., TPAMI 2018): ``lr_t = lr * (1 - t/steps)^0.9``.

Also: gradient accumulation (``grad_accum`` micro-batches per optimizer step), bf16 autocast on CPUs with
native bf16 (``amp``), and checkpoints every N steps with resume after a kill (:func:`save_checkpoint`,
:func:`load_checkpoint`). Checkpoints hold tensors in safetensors (trainable parameters and AdamW moments,
no pickle) and the step, losses, optimizer hyper-parameters and scheduler state in JSON. The data order is
replayed from ``seed`` on resume (the sampler is the only random source: the segmentor runs in eval mode),
so a resumed run ends bit-for-bit equal to an uninterrupted one.

Zero-shot training (:class:`SeenClassesDataset`: unseen pixels become the ignore index, classes renumbered to
the seen ones) and torchrun DistributedDataParallel on CPU with gloo (:func:`init_distributed`; every process
takes its ``rank::world`` share of the same seeded global batch, losses are pixel-weighted so the averaged
gradient is the whole batch's, rank 0 alone writes checkpoints) are documented on :func:`train_segmentor`.
When the text side trains (text prompts, text-tower adapters), ``text_embeds`` is a callable and the class
embeddings are recomputed with gradient at every micro-batch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from opentrans.artifacts import read_json, save_safetensors, write_json
from opentrans.data import SegDataset, collate
from opentrans.errors import OpenTransError, OpenTransWarning
from opentrans.finetune.losses import check_loss, segmentation_loss
from opentrans.models.segmentor import OpenVocabSegmentor
from opentrans.progress import progress as progress_bar
from opentrans.finetune.options import AMP_MODES, check_train_options

POLY_POWER = 0.9
#: ``amp`` choices of :func:`train_segmentor`.
#: Checkpoint files in ``checkpoint_dir``: tensors, then the JSON that commits them.
CKPT_TENSORS = "trainer_state.safetensors"
CKPT_JSON = "trainer_state.json"


def resize_masks(masks: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Stack int64 label masks of any sizes ``(h0, w0)`` into ``(B, H, W)`` with nearest-neighbour resizing
    (label values, the ignore index included, are kept exactly)."""
    out = [F.interpolate(m[None, None].float(), size=tuple(size), mode="nearest")[0, 0] for m in masks]
    return torch.stack(out).long()


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """``steps`` index lists of ``min(batch_size, n)`` items: shuffled epochs, reshuffled when used up."""
    size = min(batch_size, n)
    order: list[int] = []
    for _ in range(steps):
        batch = []
        while len(batch) < size:
            if not order:
                order = torch.randperm(n, generator=generator).tolist()
            batch.append(order.pop())
        yield batch


def resolve_amp(amp: str) -> bool:
    """Whether to autocast to bf16: ``off`` no, ``bf16`` yes, ``auto`` where the CPU has native bf16
    (:attr:`opentrans.hardware.CpuIsa.native_bf16`).

    ``bf16`` on a CPU without native bf16 is honoured but warns (:class:`~opentrans.errors.OpenTransWarning`):
    there bf16 is emulated and several times slower than fp32.

    Raises:
        OpenTransError: an unknown mode.
    """
    from opentrans.hardware import cpu_isa

    if amp not in AMP_MODES:
        raise OpenTransError(f"--amp {amp}: choose one of {', '.join(AMP_MODES)}")
    isa = cpu_isa()
    if amp == "bf16" and not isa.native_bf16:
        warnings.warn(f"--amp bf16: this CPU has no native bf16 ({isa.summary()}); bf16 is emulated and usually "
                      f"several times slower than fp32 here (--amp auto picks fp32 on it)", OpenTransWarning,
                      stacklevel=2)
    return amp == "bf16" or (amp == "auto" and isa.native_bf16)


def _fingerprint(names: list[str], **settings) -> str:
    """sha256 of the run settings and the trainable parameter names: a checkpoint resumes only its own run."""
    return hashlib.sha256(json.dumps({"names": names, **settings}, sort_keys=True).encode()).hexdigest()


def save_checkpoint(checkpoint_dir: str | os.PathLike, step: int, losses: list[float], fingerprint: str,
                    named_params: list[tuple[str, torch.nn.Parameter]], optimizer: torch.optim.Optimizer,
                    scheduler) -> Path:
    """Write the training state after ``step`` optimizer steps, atomically (tensors first, then the JSON).

    ``trainer_state.safetensors``: ``param.<name>`` (trainable parameters) and ``adam.<name>.<key>`` (AdamW
    state: ``step``, ``exp_avg``, ``exp_avg_sq``), with the step in its metadata. ``trainer_state.json``:
    ``step``, ``losses``, ``fingerprint``, the optimizer's param groups and the scheduler's state. A kill
    between the two writes leaves the JSON of the previous checkpoint, whose step no longer matches the
    tensors' metadata: :func:`load_checkpoint` refuses that pair.

    Returns:
        the JSON path.
    """
    checkpoint_dir = Path(checkpoint_dir)
    index = {id(p): i for i, p in enumerate(optimizer.param_groups[0]["params"])}
    state = optimizer.state_dict()
    tensors = {}
    for name, p in named_params:
        tensors[f"param.{name}"] = p.detach().contiguous().clone()
        for key, value in state["state"].get(index[id(p)], {}).items():
            tensors[f"adam.{name}.{key}"] = value.detach().contiguous().clone()
    save_safetensors(tensors, checkpoint_dir / CKPT_TENSORS, metadata={"step": str(step), "fingerprint": fingerprint})
    groups = [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]]
    return write_json(checkpoint_dir / CKPT_JSON, {
        "step": step, "losses": [None if not math.isfinite(v) else v for v in losses],
        "fingerprint": fingerprint, "param_groups": groups, "scheduler": scheduler.state_dict()})


def load_checkpoint(checkpoint_dir: str | os.PathLike, fingerprint: str,
                    named_params: list[tuple[str, torch.nn.Parameter]], optimizer: torch.optim.Optimizer,
                    scheduler) -> tuple[int, list[float]] | None:
    """Restore a state written by :func:`save_checkpoint`; None when ``checkpoint_dir`` holds none.

    Returns:
        ``(step, losses)``: optimizer steps already done and their losses (NaN for skipped steps).

    Raises:
        OpenTransError: the checkpoint belongs to another run (settings or trainable parameters differ),
            or its two files do not belong together (killed between writes; delete the folder).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / CKPT_JSON).exists():
        return None
    meta = read_json(checkpoint_dir / CKPT_JSON)
    if meta.get("fingerprint") != fingerprint:
        raise OpenTransError(f"{checkpoint_dir}: checkpoint of another run (different settings, data order or "
                             "trainable layers); use another --checkpoint-dir or delete it")
    tensor_path = checkpoint_dir / CKPT_TENSORS
    if not tensor_path.exists():
        raise OpenTransError(f"{tensor_path}: missing; delete {checkpoint_dir} and start again")
    with safe_open(str(tensor_path), framework="pt") as fh:
        tensor_step = (fh.metadata() or {}).get("step")
    if tensor_step != str(meta["step"]):
        raise OpenTransError(f"{checkpoint_dir}: tensors are from step {tensor_step} but the JSON says step "
                             f"{meta['step']}; delete it and start again")
    tensors = load_file(str(tensor_path))
    state = {}
    with torch.no_grad():
        for i, (name, p) in enumerate(named_params):
            p.copy_(tensors[f"param.{name}"])
            entry = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"adam.{name}.")
                     and k.count(".") == name.count(".") + 2}
            if entry:
                state[i] = entry
    groups = [{**g, "params": list(range(len(named_params)))} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    scheduler.load_state_dict(meta["scheduler"])
    return int(meta["step"]), [float("nan") if v is None else float(v) for v in meta["losses"]]


class SeenClassesDataset(torch.utils.data.Dataset):
    """A view of a :class:`~opentrans.data.SegDataset` that keeps only the *seen* classes (zero-shot training).

    Class indices are renumbered to the order of the seen classes (``class_names``) and every pixel of an
    unseen class becomes ``ignore_index``, so training never receives an unseen label and the seen classes'
    text embeddings are the only classifier rows (the inductive zero-shot protocol of ZS3Net, Bucher et al.,
    NeurIPS 2019, Sec. 4, followed by ZegCLIP, SPT-SEG and LDVC).

    Args:
        dataset: the full dataset (images ``(3, H, W)``, masks ``(h0, w0)`` int64).
        unseen: names of the classes to hide; each must be a class of ``dataset`` and at least one must stay.

    Attributes:
        class_names, ignore_index, image_size, name: as the wrapped dataset, ``class_names`` without the unseen.
        seen_index: the original class index of each kept class.

    Raises:
        OpenTransError: an unknown class name, or every class unseen.
    """

    def __init__(self, dataset, unseen: list[str] | tuple[str, ...]):
        names = list(dataset.class_names)
        unknown = [u for u in unseen if u not in names]
        if unknown:
            raise OpenTransError(f"--unseen-classes: '{unknown[0]}' is not a class of {dataset.name}; "
                                 f"choose from {', '.join(names)}")
        self.dataset = dataset
        self.seen_index = [i for i, n in enumerate(names) if n not in set(unseen)]
        if not self.seen_index:
            raise OpenTransError("--unseen-classes: every class is unseen; at least one class must be seen")
        self.class_names = tuple(names[i] for i in self.seen_index)
        self.ignore_index = dataset.ignore_index
        self.image_size = dataset.image_size
        self.name = dataset.name
        lut = torch.full((max(len(names), dataset.ignore_index + 1),), dataset.ignore_index, dtype=torch.int64)
        for new, old in enumerate(self.seen_index):
            lut[old] = new
        self._lut = lut

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.dataset[idx]
        return image, self._lut[mask.long()]


def distributed_world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised default process group, else ``(0, 1)``."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> bool:
    """Under ``torchrun`` (environment ``WORLD_SIZE > 1``), initialise the default process group with the gloo
    backend (CPU) unless one exists; returns True when this call created it (the caller destroys it)."""
    dist = torch.distributed
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    dist.init_process_group("gloo")
    return True


def barrier() -> None:
    """``torch.distributed.barrier()`` when a process group with more than one process exists, else nothing."""
    if distributed_world()[1] > 1:
        torch.distributed.barrier()


class _TrainForward(torch.nn.Module):
    """The training forward as one module (what DistributedDataParallel wraps): logits of ``seg`` against the
    fixed class embeddings, or against ``text_fn()`` recomputed (with gradient) at every call when the text
    side trains (text prompts, text-tower adapters)."""

    def __init__(self, seg: OpenVocabSegmentor, text: torch.Tensor | Callable[[], torch.Tensor]):
        super().__init__()
        self.seg = seg
        self.text = text

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        text = self.text() if callable(self.text) else self.text
        return self.seg(images, text)


def train_segmentor(seg: OpenVocabSegmentor, dataset: SegDataset,
                    text_embeds: torch.Tensor | Callable[[], torch.Tensor], steps: int, batch_size: int,
                    lr: float, seed: int = 0, weight_decay: float = 0.01,
                    progress: bool = True, grad_accum: int = 1, amp: str = "off",
                    checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 0,
                    on_step: Callable[[int, float], None] | None = None, loss: str = "ce") -> list[float]:
    """Finetune the trainable parameters of ``seg`` on ``dataset`` for ``steps`` optimizer steps.

    The segmentor stays in eval mode (BatchNorm statistics of a ModifiedResNet are not updated, there is
    no dropout), so only parameters with ``requires_grad`` change. Batches are drawn without replacement
    from shuffled epochs of ``dataset`` with a ``torch.Generator`` seeded with ``seed``, so two runs with the
    same seed give identical losses. Each optimizer step accumulates the gradients of ``grad_accum``
    micro-batches of ``batch_size`` images (each micro-batch loss divided by ``grad_accum``). A micro-batch
    whose pixels are all the ignore index contributes nothing; a step with no labelled pixel at all is
    skipped (its loss recorded as NaN) while the learning-rate schedule still advances. Rows of a partly
    trainable fused in-projection (:func:`~opentrans.finetune.freeze.row_masked_parameters`) are written
    back after every step so that weight decay does not move them. A tqdm bar shows the step's loss and
    learning rate.

    With ``checkpoint_dir`` and ``checkpoint_every = N > 0`` the state is saved every N steps and after
    the last one (:func:`save_checkpoint`); a call with the same ``checkpoint_dir``, the same settings and
    a model rebuilt from the same starting weights resumes from the last checkpoint and ends bit-for-bit
    where an uninterrupted run would.

    **Distributed data parallel.** When a default process group with ``W > 1`` processes is initialised
    (``torchrun``; :func:`init_distributed`), the training forward is wrapped in
    :class:`~torch.nn.parallel.DistributedDataParallel`: every process draws the same seeded global batch of
    ``batch_size`` images and takes its ``rank::W`` share. Each process's loss is scaled by
    ``W n_r / N`` (``n_r`` its labelled pixels, ``N`` the batch's, all-reduced), so DDP's gradient average is
    the gradient of the pixel-weighted loss over the whole global batch: for ``ce`` and ``focal`` the update
    equals the single-process one (within float tolerance); for ``dice``/``ssim`` it is the pixel-weighted
    mean of the per-shard losses. Only rank 0 writes checkpoints and shows the bar; the others wait at a
    barrier after each save.

    Args:
        seg: the segmentor, parameters already frozen/unfrozen.
        dataset: images ``(3, H, W)`` at ``seg.image_size`` and masks ``(h0, w0)`` with
            ``dataset.ignore_index`` for unlabelled pixels; class i of the masks is row i of ``text_embeds``
            (:class:`SeenClassesDataset` restricts both to the seen classes of a zero-shot split).
        text_embeds: float32 ``(C, D)`` class embeddings (fixed), or a callable returning them with gradient
            (called at every micro-batch; for text prompts or text-tower adapters that train).
        steps: optimizer steps (>= 1).
        batch_size: images per micro-batch (>= 1; capped at ``len(dataset)``), over all processes under DDP
            (then a multiple of the process count).
        lr: peak AdamW learning rate, decayed with the poly schedule.
        seed: seeds the sampling order.
        weight_decay: AdamW decoupled weight decay.
        progress: show a tqdm bar with the loss and learning rate.
        grad_accum: micro-batches per optimizer step (>= 1).
        amp: ``off``, ``bf16`` (``torch.autocast('cpu', torch.bfloat16)`` around the forward pass; the loss
            is computed in float32) or ``auto`` (bf16 where the CPU has native bf16, :func:`cpu_supports_bf16`).
        checkpoint_dir, checkpoint_every: see above (``checkpoint_every = 0``: no checkpoints).
        loss: a name of :data:`~opentrans.finetune.losses.LOSS_FUNCTIONS` (``ce`` default, ``focal``, ``dice``,
            ``focal-dice``, ``ssim``, ``focal-ssim``; :mod:`opentrans.finetune.losses`).
        on_step: called as ``on_step(step, loss)`` after each optimizer step (1-based), after any checkpoint
            of that step; an exception it raises stops training (tests use it to simulate a kill).

    Returns:
        The training loss (``loss`` averaged over the step's labelled micro-batches; the cross-entropy in
        nats by default) of every step, resumed steps included (under DDP: of the global batch, the same on
        every process).

    Raises:
        OpenTransError: bad options (see :func:`check_train_options`, :func:`resolve_amp`), an image size
            other than ``seg.image_size``, a class count other than ``len(text_embeds)``, no trainable
            parameter, a checkpoint of another run, a global batch that is not a multiple of the process
            count, or a loss that became NaN/inf (lower the learning rate).
    """
    check_train_options(steps, batch_size, lr, grad_accum, checkpoint_every)
    use_bf16 = resolve_amp(amp)
    check_loss(loss)
    text_embeds = _checked_text(seg, dataset, text_embeds)
    named = [(n, p) for n, p in seg.named_parameters() if p.requires_grad]
    if not named:
        raise OpenTransError("nothing to train: no parameter of the model requires a gradient")
    rank, world = distributed_world()
    if world > 1 and min(batch_size, len(dataset)) % world:
        raise OpenTransError(f"--batch-size {batch_size}: the global batch ({min(batch_size, len(dataset))} images) "
                             f"must be a multiple of the {world} processes")

    seg.eval()
    optimizer = torch.optim.AdamW([p for _, p in named], lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=steps, power=POLY_POWER)
    loop = _Loop(seg=seg, dataset=dataset, forward=_wrap_forward(seg, text_embeds, world), optimizer=optimizer,
                 masked=_frozen_rows(seg), loss=loss, use_bf16=use_bf16, grad_accum=grad_accum, lr=lr, rank=rank,
                 world=world)
    fingerprint = _fingerprint([n for n, _ in named], steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                               weight_decay=weight_decay, grad_accum=grad_accum, amp=use_bf16, loss=loss,
                               data=len(dataset), classes=list(dataset.class_names))
    if callable(text_embeds):
        fingerprint = _fingerprint([fingerprint], text_trains=True)
    start_step, losses = 0, []
    if checkpoint_dir is not None:
        fingerprint = _fingerprint([fingerprint], start_weights=_weights_digest(seg))
        resumed = load_checkpoint(checkpoint_dir, fingerprint, named, optimizer, scheduler)
        if resumed is not None:
            start_step, losses = resumed
    batches = _batches(len(dataset), batch_size, steps * grad_accum, torch.Generator().manual_seed(seed))
    for _ in range(start_step * grad_accum):  # replay the sampler: same data order as an uninterrupted run
        next(batches)
    bar = progress_bar(range(start_step, steps), total=steps, initial=start_step, desc="finetune",
                       disable=not progress or rank != 0, leave=False)
    with torch.enable_grad():
        for step in bar:
            current_lr = optimizer.param_groups[0]["lr"]
            losses.append(_train_step(loop, batches, step))
            if math.isfinite(losses[-1]):
                bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{current_lr:.2e}")
            scheduler.step()
            done = step + 1
            if checkpoint_dir is not None and checkpoint_every and (done % checkpoint_every == 0 or done == steps):
                if rank == 0:
                    save_checkpoint(checkpoint_dir, done, losses, fingerprint, named, optimizer, scheduler)
                barrier()
            if on_step is not None:
                on_step(done, losses[-1])
    optimizer.zero_grad(set_to_none=True)
    return losses


def _checked_text(seg: OpenVocabSegmentor, dataset, text_embeds):
    """Fixed class embeddings detached as float32 ``(C, D)`` (a callable is returned as it is).

    Raises:
        OpenTransError: images of another size than ``seg.image_size``, or a class count other than ``C``.
    """
    if tuple(dataset.image_size) != tuple(seg.image_size):
        raise OpenTransError(f"dataset images are {dataset.image_size} but the model takes {seg.image_size}")
    if callable(text_embeds):
        return text_embeds
    text_embeds = text_embeds.detach().float()
    if len(dataset.class_names) != text_embeds.shape[0]:
        raise OpenTransError(f"{len(dataset.class_names)} classes in the dataset but {text_embeds.shape[0]} "
                             "text embeddings")
    return text_embeds


def _wrap_forward(seg: OpenVocabSegmentor, text_embeds, world: int) -> torch.nn.Module:
    """The training forward (:class:`_TrainForward`), under DistributedDataParallel when ``world > 1``."""
    forward = _TrainForward(seg, text_embeds)
    if world > 1:
        from opentrans.finetune.freeze import gradient_free_parameters

        # parameters without a gradient path need DDP's (slower) unused-parameter search; the stage freezes them
        unused = bool(gradient_free_parameters(seg))
        forward = torch.nn.parallel.DistributedDataParallel(forward, find_unused_parameters=unused)
    return forward


def _frozen_rows(seg: OpenVocabSegmentor) -> list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]]:
    """``(parameter, frozen-row mask, their values)`` of every partly trainable fused in-projection."""
    from opentrans.finetune.freeze import row_masked_parameters

    return [(p, ~mask, p.detach()[~mask].clone()) for p, mask in row_masked_parameters(seg)]


def _weights_digest(seg: OpenVocabSegmentor) -> str:
    """sha256 of the state dict: the starting weights are part of a run, a checkpoint must not resume onto another
    model."""
    digest = hashlib.sha256()
    for name, value in seg.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class _Loop:
    """What one optimizer step of :func:`train_segmentor` needs."""

    seg: OpenVocabSegmentor
    dataset: SegDataset
    forward: torch.nn.Module
    optimizer: torch.optim.Optimizer
    masked: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]]
    loss: str
    use_bf16: bool
    grad_accum: int
    lr: float
    rank: int
    world: int


def _labelled_pixels(loop: _Loop, target: torch.Tensor) -> tuple[int, int]:
    """``(labelled pixels of this process's share, of the whole global batch)``."""
    n_local = int((target != loop.dataset.ignore_index).sum())
    if loop.world == 1:
        return n_local, n_local
    count = torch.tensor([n_local], dtype=torch.int64)
    torch.distributed.all_reduce(count)
    return n_local, int(count)


def _micro_batch(loop: _Loop, idx: list[int], step: int) -> float | None:
    """Forward and backward of one micro-batch (gradients accumulate); its loss (of the global batch under
    DDP), or None when no process has a labelled pixel.

    Raises:
        OpenTransError: the loss became NaN/inf.
    """
    images, masks = collate([loop.dataset[i] for i in idx[loop.rank::loop.world]])
    target = resize_masks(masks, loop.seg.image_size)
    n_local, n_global = _labelled_pixels(loop, target)
    if n_global == 0:
        return None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=loop.use_bf16):
        logits = loop.forward(images)
    if n_local:
        value = segmentation_loss(logits, target, loop.dataset.ignore_index, loop.loss)
    else:  # this process's share is unlabelled: a zero loss that still reaches every parameter (DDP)
        value = logits.float().sum() * 0.0
    if loop.world > 1:
        share = value.detach().reshape(1) * (n_local / n_global)
        torch.distributed.all_reduce(share)
        logged = float(share)
    else:
        logged = float(value.detach())
    if not math.isfinite(logged):
        raise OpenTransError(f"training loss became {logged} at step {step + 1}; lower --lr (now {loop.lr})")
    if loop.world > 1:
        value = value * (n_local * loop.world / n_global)
    (value / loop.grad_accum).backward()
    return logged


def _train_step(loop: _Loop, batches, step: int) -> float:
    """One optimizer step over ``grad_accum`` micro-batches; frozen rows of fused in-projections are written back.
    Returns the mean loss of the labelled micro-batches, NaN when none had a labelled pixel (step skipped)."""
    loop.optimizer.zero_grad(set_to_none=True)
    logged = [v for v in (_micro_batch(loop, next(batches), step) for _ in range(loop.grad_accum)) if v is not None]
    if not logged:
        return float("nan")
    loop.optimizer.step()
    with torch.no_grad():
        for p, frozen_rows, values in loop.masked:
            p[frozen_rows] = values
    return sum(logged) / len(logged)
