#!/usr/bin/env python
"""Search-speed benchmark, runnable from a checkout: `blockpruner benchmark-search` (the code is
blockpruner/benchmark.py; benchmarks/README.md has the commands and the measured table).

  python benchmarks/search_speed.py --tiny --k 4 --methods plain,prefix,exact,screened
  python benchmarks/search_speed.py --model DIR --calib DIR --k 4
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's package

from blockpruner.cli import build_parser  # noqa: E402
from blockpruner.report.search_speed import run_cli  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    """Parse benchmark-search's options and run it; returns the figures."""
    return run_cli(build_parser().parse_args(["benchmark-search", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    main()
