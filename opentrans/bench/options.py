"""The options of ``opentrans bench``: one typed dataclass that the CLI flags, the recipe's ``bench`` section and
:func:`opentrans.bench.stage.bench_stage` read (each default written once)."""

from __future__ import annotations

from dataclasses import dataclass

import click

from opentrans.errors import OpenTransError
from opentrans.options import StageOptions, option

#: The datasets' splits.
SPLITS = ("train", "val", "test")


def parse_batch_sizes(text: str) -> list[int]:
    """``"1,4"`` -> ``[1, 4]`` (the ``--batch-sizes`` flag).

    Raises:
        OpenTransError: not comma-separated integers.
    """
    try:
        return [int(b) for b in text.split(",")]
    except ValueError:
        raise OpenTransError(f"--batch-sizes {text}: expected comma-separated integers, e.g. 1,4") from None


#: ``--batch-sizes``' help (the CLI takes them as one comma-separated value).
BENCH_BATCH_HELP = "Batch sizes to time, e.g. 1,4; the first one is the table's headline latency."


@dataclass
class BenchOptions(StageOptions):
    """Options of ``opentrans bench`` (the recipe's ``bench`` keys); the dataset and the reference model are the
    stage's arguments. The CLI's ``--limit`` defaults to every image (``None``), a recipe's to 24."""

    split: str = option("val", "", choices=SPLITS)
    limit: int | None = option(24, "Use only the first N images.", type=click.IntRange(min=1))
    warmup: int = option(3, "", type=click.IntRange(min=0))
    repeats: int = option(20, "", type=click.IntRange(min=1))
    batch_sizes: list[int] = option(default_factory=lambda: [1], help=BENCH_BATCH_HELP, metavar="B[,B...]", cli=False)
    roofline: bool = option(True, "Measure this machine's peak GEMM throughput (fp32, bf16, int8) and report each "
                            "build's fraction.", secondary="--no-roofline")

    def check(self) -> None:
        """Raise :class:`OpenTransError` (one line) for counts out of range; duplicate batch sizes are dropped."""
        super().check()
        self.batch_sizes = list(dict.fromkeys(int(b) for b in self.batch_sizes))
        if self.repeats < 1 or self.warmup < 0 or not self.batch_sizes or min(self.batch_sizes) < 1:
            raise OpenTransError(f"need repeats >= 1, warmup >= 0 and batch sizes >= 1 (got {self.repeats}, "
                                 f"{self.warmup}, {tuple(self.batch_sizes)})")
        if self.limit is not None and self.limit < 1:
            raise OpenTransError(f"--limit {self.limit}: must be at least 1")
