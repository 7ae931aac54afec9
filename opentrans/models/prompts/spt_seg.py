"""SPT-SEG's spectral prompts: deep visual prompt tokens plus a frequency-domain term on the patch tokens of the
shallow blocks.

Paper: Xu, Xu, Wang, Xu, Guo, Zhang, Zhang, "Spectral Prompt Tuning: Unveiling Unseen Classes for Zero-Shot
Semantic Segmentation", AAAI 2024 (arXiv:2312.12754), section "Spectral Prompt Tuning" (SPT). Official code:
github.com/clearxu/SPT at commit cc648df3076335cea5faa26f4ce1296e7ad0049a, ``models/backbone/img_encoder.py``
(``VPTCLIPVisionTransformer``: ``fre_filter`` l. 236-255, ``forward`` l. 257-, ``forward_deep_prompt``,
``_init_prompt``).

The formulas below are transcribed from that code (which produced the published numbers); the paper text, and
so its equation numbers, could not be read offline, so no equation number is quoted: check them against the
paper's SPT section. Per block ``i`` in ``layers`` (default the first two, as the code's ``i == 0`` input and
``i < 2`` deep step), with patch tokens ``X`` ``(B, h, w, W)`` and the block's CLS token ``x_cls`` ``(B, W)``::

    G  = X * x_cls                                     # spatial-domain gating by the CLS token (element-wise)
    S  = IRFFT2( RFFT2(G) * K )                        # 2-D real FFT over the patch grid, norm="ortho"
    X <- X + S                                         # the "spectral prompt" added to the patch tokens

``K`` ``(h, w//2+1, W)`` is a learnable complex filter (stored as real and imaginary parts) shared by the layers
(the code has one ``complex_weight`` for both), initialised ``N(0, 0.02^2)`` per part as in the code, so the
spectral term starts small but not zero (about 2-3 % of the patch-token norm). The gate ``g`` of the SPT-SEG
spectral prompt is therefore not a free parameter: it is the CLS token of the same block input.

Deep prompts (VPT-deep, Jia et al. ECCV 2022, as in the code's ``forward_deep_prompt``): ``tokens`` learnable
tokens ``(P, W)`` per block, passed through a shared ``Linear(W, W)`` (``prompt_proj``, Kaiming-normal fan-out)
and dropout (``prompt_dropout``), replacing the previous block's prompts. The code's dropout is 0.1; the default
here is 0 because :func:`~opentrans.finetune.trainer.train_segmentor` trains in eval mode (no dropout acts) and a
module attached after ``.eval()`` is in training mode, where a non-zero dropout would make inference random.
Initialisation is VPT's Xavier uniform ``U(-v, v)``, ``v = sqrt(6 / (3 * patch^2 + W))``.

Interpretations and departures (stated, not hidden):

* The CLS token is CLIP's: ``class_embedding + positional_embedding[0]``. The authors' encoder adds the class
  embedding a second time (``cls_pos = pos[0, :] + self.class_embedding`` in ``forward``, img_encoder.py l. 265,
  on top of the ``class_embedding`` token of l. 262), so their CLS input is ``2 class_embedding + pos[0]``, which
  is not what the pretrained CLIP was trained with; we do not copy that (the spectral gate ``x_cls`` and every
  block then see a different CLS token than theirs).
* Token order follows :mod:`opentrans.models.prompts`: prompts at the **end** (the code puts them after CLS).
* Deep prompts go into every block except the last: the training-free dense modes read the last block out by hand
  (its forward pre-hook never fires), so tokens there would be dead parameters. The code's final extra
  ``prompt_norm`` LayerNorm on the encoder output is not used (it would change the training-free readout).
* The code fixes ``K`` at a 32x32 grid (512 px, patch 16). Here ``K`` is learnt at ``grid`` (default: the CLIP
  tower's pretraining grid; pass the segmentor's ``feature_grid``). Another grid at run time bilinearly resizes
  the real and imaginary parts of ``K`` (``align_corners=True``), the resolution transfer GFNet (Rao et al.,
  NeurIPS 2021) uses for its global filters; with ``strict_grid=True`` another grid raises instead.
* ONNX: ``torch.fft`` does not export with the TorchScript exporter (``aten::fft_rfft2`` is unsupported at opset
  17), so the transform is written as real matrix products with DFT matrices built for the grid
  (:func:`spectral_filter`), mathematically identical to ``torch.fft`` (tested to float32 precision). In a
  dynamic height/width export (:func:`opentrans.models.dense.symbolic_grid`) the DFT matrices are built in the
  graph from the traced grid and the filter is always resized to it (the identity at the learnt grid);
  ``strict_grid`` cannot be checked there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from opentrans.errors import OpenTransError
from opentrans.models import dense as _dense
from opentrans.models.prompts import PromptModule, append_tokens, register_prompts

#: Standard deviation of each part of the spectral filter at init (``torch.randn(...) * 0.02`` in the code).
FILTER_INIT_STD = 0.02


def dft_matrices(h, w, dtype: torch.dtype = torch.float32, device=None,
                 compute_dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Real DFT matrices for an ``(h, w)`` grid, computed in ``compute_dtype`` and cast to ``dtype``.

    ``h`` and ``w`` are ints, or 0-dim tensors while tracing a graph with a dynamic grid (every step is a plain
    tensor op: Range, Mul, Mod, Cos, Sin). Angles are reduced modulo the period in integers first
    (``2 pi ((n v) mod w) / w``), so float32 matrices stay accurate.

    Returns ``{"cw", "sw"}`` ``(w, w//2+1)``: ``cos / sin(2 pi n v / w) / sqrt(w)`` (forward real FFT along w);
    ``{"ch", "sh"}`` ``(h, h)``: ``cos / sin(2 pi m u / h) / sqrt(h)`` (symmetric); and ``{"icw", "isw"}``
    ``(w//2+1, w)``: the inverse real FFT along w, ``c_v cos / sin(2 pi v n / w) / sqrt(w)`` with ``c_0 = 1``,
    ``c_{w/2} = 1`` (w even) and ``c_v = 2`` otherwise (Hermitian symmetry).
    """
    n = torch.arange(w, device=device)
    v = torch.arange(w // 2 + 1, device=device)
    m = torch.arange(h, device=device)
    scale_w = 1.0 / torch.sqrt(torch.as_tensor(w, dtype=compute_dtype, device=device))
    scale_h = 1.0 / torch.sqrt(torch.as_tensor(h, dtype=compute_dtype, device=device))
    ang_w = (2 * math.pi) * torch.remainder(torch.outer(n, v), w).to(compute_dtype) / w  # (w, wr)
    ang_h = (2 * math.pi) * torch.remainder(torch.outer(m, m), h).to(compute_dtype) / h  # (h, h)
    coef = (2 - (v == 0).to(compute_dtype) - (2 * v == w).to(compute_dtype))[:, None]  # (wr, 1)
    out = {
        "cw": torch.cos(ang_w) * scale_w, "sw": torch.sin(ang_w) * scale_w,
        "ch": torch.cos(ang_h) * scale_h, "sh": torch.sin(ang_h) * scale_h,
        "icw": coef * torch.cos(ang_w.t()) * scale_w, "isw": coef * torch.sin(ang_w.t()) * scale_w,
    }
    return {k: t.to(dtype=dtype) for k, t in out.items()}


def _dynamic_grid() -> bool:
    """True while tracing an export with a dynamic patch grid (:func:`opentrans.models.dense.symbolic_grid`):
    grid sizes are then traced values and must not become constants."""
    return torch.jit.is_tracing() and bool(_dense._SYMBOLIC_GRID)


def spectral_filter(x: torch.Tensor, weight: torch.Tensor, mats: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """``irfft2(rfft2(x, norm="ortho") * (weight[0] + i weight[1]), s=(h, w), norm="ortho")`` with real matmuls.

    Args:
        x: real input ``(B, C, h, w)``.
        weight: the filter's real and imaginary parts ``(2, C, h, w//2+1)``.
        mats: :func:`dft_matrices` for ``(h, w)`` (built here when None).

    Returns:
        ``(B, C, h, w)``, equal to the ``torch.fft`` expression above up to float rounding; only MatMul/Mul/Add
        nodes, so it exports to any ONNX opset.
    """
    if mats is None:
        mats = dft_matrices(int(x.shape[-2]), int(x.shape[-1]), x.dtype, x.device)
    # forward real FFT along w: X = sum_n x[n] e^{-2 pi i n v / w}
    yr = x @ mats["cw"]
    yi = -(x @ mats["sw"])  # (B, C, h, wr)
    # forward FFT along h: Z = (Ch - i Sh)(Yr + i Yi)
    zr = mats["ch"] @ yr + mats["sh"] @ yi
    zi = mats["ch"] @ yi - mats["sh"] @ yr
    # filter in the frequency domain: P = Z * K
    kr, ki = weight[0], weight[1]
    pr = zr * kr - zi * ki
    pi = zr * ki + zi * kr
    # inverse FFT along h: Q = (Ch + i Sh) P
    qr = mats["ch"] @ pr - mats["sh"] @ pi
    qi = mats["ch"] @ pi + mats["sh"] @ pr
    # inverse real FFT along w (imaginary parts of the DC/Nyquist bins are dropped, as irfft does)
    return qr @ mats["icw"] - qi @ mats["isw"]


def spectral_filter_fft(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`spectral_filter` with ``torch.fft`` (SPT-SEG code's ``fre_filter``); not exportable."""
    spec = torch.fft.rfft2(x, dim=(-2, -1), norm="ortho")
    spec = spec * torch.complex(weight[0], weight[1])
    return torch.fft.irfft2(spec, s=x.shape[-2:], dim=(-2, -1), norm="ortho")


@register_prompts("spt-seg")
class SPTSegPrompts(PromptModule):
    """SPT-SEG spectral prompts (see the module docstring for the paper, code and formulas).

    Args:
        clip: an ``open_clip.CLIP`` with a ViT image tower.
        tokens: deep prompt tokens per block (P; the code's ``num_tokens``; 10 by default).
        layers: blocks (0-based) whose input patch tokens get the spectral term (default ``[0, 1]``).
        grid: ``[h, w]`` patch grid the filter is learnt at (pass ``seg.feature_grid``); default the tower's
            pretraining grid.
        dropout: dropout on the projected prompt tokens (the code's 0.1; default 0, see the module notes).
        strict_grid: raise on a run-time grid other than ``grid`` instead of resizing the filter.

    Token layout in block ``i``: ``(B, 1 + h*w + P, W)``, prompts last.

    Raises:
        OpenTransError: a non-ViT image tower (ResNet), ``tokens < 0``, a block index out of range, a bad grid or
            dropout; at run time, with ``strict_grid``, a grid other than ``grid``.
    """

    def __init__(self, clip: nn.Module, tokens: int = 10, layers: list[int] | tuple[int, ...] = (0, 1),
                 grid: list[int] | tuple[int, int] | None = None, dropout: float = 0.0, strict_grid: bool = False):
        super().__init__()
        visual = clip.visual
        if not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
            raise OpenTransError(f"prompts 'spt-seg' need a ViT image tower; {type(visual).__name__} has no token "
                                 "sequence (use a ViT model, or a head-only finetune for ResNets)")
        blocks = visual.transformer.resblocks
        width = visual.class_embedding.shape[0]
        self.n = int(tokens)
        if self.n < 0:
            raise OpenTransError(f"prompts 'spt-seg': tokens must be >= 0, got {tokens}")
        self.layers = sorted({int(i) for i in layers})
        if any(i < 0 or i >= len(blocks) for i in self.layers):
            raise OpenTransError(f"prompts 'spt-seg': layers {list(layers)} outside 0..{len(blocks) - 1}")
        try:
            grid = tuple(int(g) for g in (visual.grid_size if grid is None else grid))
        except (TypeError, ValueError):
            grid = ()
        if len(grid) != 2 or min(grid) < 1:
            raise OpenTransError("prompts 'spt-seg': grid must be [h, w] with positive integer sizes (patches)")
        if not 0.0 <= float(dropout) < 1.0:
            raise OpenTransError(f"prompts 'spt-seg': dropout must be in [0, 1), got {dropout}")
        self.filter_grid = grid
        self.dropout_p = float(dropout)
        self.strict_grid = bool(strict_grid)
        self.depth = max(len(blocks) - 1, 1)  # blocks with deep prompts: all but the last (see module notes)
        patch = visual.patch_size[0] if isinstance(visual.patch_size, (tuple, list)) else visual.patch_size
        bound = math.sqrt(6.0 / float(3 * patch * patch + width))
        self.tokens = nn.Parameter(torch.empty(self.depth, self.n, width).uniform_(-bound, bound))
        self.proj = nn.Linear(width, width)
        nn.init.kaiming_normal_(self.proj.weight, a=0, mode="fan_out")
        self.drop = nn.Dropout(self.dropout_p)
        h, w = self.filter_grid
        self.filter = nn.Parameter(torch.randn(2, width, h, w // 2 + 1) * FILTER_INIT_STD)
        self._mats: dict = {}

    def options(self) -> dict:
        return {"tokens": self.n, "layers": list(self.layers), "grid": list(self.filter_grid),
                "dropout": self.dropout_p, "strict_grid": self.strict_grid}

    def filter_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """The filter ``(2, W, h, w//2+1)`` for a run-time patch grid ``(h, w)`` (bilinearly resized when it differs
        from :attr:`filter_grid`).

        Raises:
            OpenTransError: ``strict_grid`` and a grid other than :attr:`filter_grid`.
        """
        dynamic = _dynamic_grid()
        if not dynamic and tuple(grid) == self.filter_grid:
            return self.filter
        if self.strict_grid and not dynamic:
            raise OpenTransError(f"prompts 'spt-seg': spectral filter learnt for a {self.filter_grid} patch grid, "
                                 f"got {tuple(grid)} (build the prompts with grid={list(grid)} or strict_grid=False)")
        two, width, fh, fw = self.filter.shape
        size = (grid[0], grid[1] // 2 + 1)  # traced sizes in a dynamic-grid export (resizing to the same size
        # with align_corners=True is the identity, so the graph is exact at the learnt grid too)
        resized = F.interpolate(self.filter.reshape(1, two * width, fh, fw), size=size, mode="bilinear",
                                align_corners=True)
        return resized.reshape(two, width, size[0], size[1])

    def _matrices(self, h, w, like: torch.Tensor) -> dict[str, torch.Tensor]:
        if _dynamic_grid():  # traced sizes: build them in the graph, in float32 (ONNX Cos/Sin), never cached
            return dft_matrices(h, w, like.dtype, like.device, compute_dtype=torch.float32)
        key = (h, w, like.dtype, like.device)
        if key not in self._mats:
            self._mats[key] = dft_matrices(h, w, like.dtype, like.device)
        return self._mats[key]

    def spectral_term(self, patches: torch.Tensor, cls: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The spectral prompt ``S = IRFFT2(RFFT2(X * x_cls) * K)`` ``(B, h*w, W)`` for patch tokens ``X``
        ``(B, h*w, W)`` and the CLS token ``x_cls`` ``(B, 1, W)`` on the patch grid ``(h, w)``."""
        h, w = grid
        b, n, width = patches.shape
        gated = (patches * cls).transpose(1, 2).reshape(b, width, h, w)  # (B, W, h, w)
        out = spectral_filter(gated, self.filter_for(grid).to(gated.dtype), self._matrices(h, w, gated))
        return out.reshape(b, width, n).transpose(1, 2)

    def _block_hook(self, i: int):
        def hook(_module, args):
            x = args[0]  # (B, 1 + h*w + P_prev, W)
            if self.grid is None:
                raise OpenTransError("prompts 'spt-seg': no patch grid recorded (the ViT's conv1 did not run)")
            grid = tuple(self.grid) if _dynamic_grid() else (int(self.grid[0]), int(self.grid[1]))
            if i in self.layers:
                n = grid[0] * grid[1]
                cls, patches, rest = x[:, :1], x[:, 1:1 + n], x[:, 1 + n:]
                x = torch.cat([cls, patches + self.spectral_term(patches, cls, grid), rest], dim=1)
            if i < self.depth and self.n:
                x = append_tokens(x, self.drop(self.proj(self.tokens[i])), 0 if i == 0 else self.n)
            return (x, *args[1:])

        return hook

    def _install(self, clip: nn.Module) -> None:
        self._track_grid(clip.visual)
        for i, block in enumerate(clip.visual.transformer.resblocks):
            if i in self.layers or (i < self.depth and self.n):
                self._hook(block, self._block_hook(i))
