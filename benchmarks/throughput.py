"""Throughput benchmark (same as `bonexray bench`): prints one JSON object as its last line.

    python benchmarks/throughput.py --quick
"""

from __future__ import annotations

import sys

from bonexray.cli import cli

if __name__ == "__main__":
    cli(["bench", *sys.argv[1:]], prog_name="throughput.py")
