"""Segmentation datasets: CamVid as shipped, and a plain folder layout.

Use :func:`open_dataset` with a ``FORMAT:PATH`` spec, e.g. ``camvid:../shared/data/camvid``.
"""

from opentrans.data.datasets import (
    DATA_FORMATS,
    SegDataset,
    collate,
    open_dataset,
    parse_data_spec,
)

__all__ = ["DATA_FORMATS", "SegDataset", "collate", "open_dataset", "parse_data_spec"]
