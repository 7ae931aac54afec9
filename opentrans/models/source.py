"""Where a stage's model comes from: the typed form of the CLI's model options, shared by every stage."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from opentrans.errors import OpenTransError


@dataclass(frozen=True)
class ModelSource:
    """The model a stage starts from: an earlier stage's directory (``from_dir``) or an open_clip architecture
    (``model`` + ``pretrained``), with the options that shape it.

    Attributes:
        from_dir: model directory of an earlier stage (``--from``; a deploy build for eval/segment).
        model: open_clip architecture (``--model``), e.g. ``ViT-B-16``.
        pretrained: open_clip tag, local checkpoint path or ``none`` (random init).
        image_size: network input (H, W) in pixels; None = the model's native size (short side).
        dense_mode: training-free dense mode; with ``model`` the mode built (None = maskclip), with ``from_dir`` a
            replacement of the stored mode (None = keep it).
        allow_pickle: let a ``pretrained`` checkpoint holding pickled objects be unpickled (runs its code).
    """

    from_dir: Path | None = None
    model: str | None = None
    pretrained: str = "none"
    image_size: tuple[int, int] | None = None
    dense_mode: str | None = None
    allow_pickle: bool = False

    def check(self) -> None:
        """Raises :class:`OpenTransError` when neither or both of ``from_dir`` and ``model`` are given."""
        if self.from_dir is not None and self.model is not None:
            raise OpenTransError("give either --from RUN_DIR or --model NAME, not both")
        if self.from_dir is None and self.model is None:
            raise OpenTransError("no model: give --model NAME (an open_clip architecture) or --from RUN_DIR")

    def resolve(self, head: str = "linear"):
        """``(segmentor, spec, input files)`` of this source (see :func:`opentrans.models.artifact.resolve_model`;
        ``head`` is the head a fresh ``model`` gets).

        Raises:
            OpenTransError: as :func:`~opentrans.models.artifact.resolve_model`.
        """
        from opentrans.models.artifact import resolve_model
        from opentrans.models.clip import pickle_allowed

        with pickle_allowed(self.allow_pickle):
            return resolve_model(self.from_dir, self.model, self.pretrained, image_size=self.image_size, head=head,
                                 dense_mode=self.dense_mode)

    def record(self) -> dict:
        """JSON-able description for a manifest's options."""
        return {"from_dir": None if self.from_dir is None else str(self.from_dir), "model": self.model,
                "pretrained": self.pretrained, "image_size": None if self.image_size is None else list(self.image_size),
                "dense_mode": self.dense_mode}
