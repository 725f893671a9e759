"""Run the whole performance suite (`trainformer bench`) from a checkout, passing options through.

    python benchmarks/speed/run_all.py --quick --out bench_out      # smoke sizes
    python benchmarks/speed/run_all.py --out bench_out              # full (quiet machine, tens of minutes on CPU)
    python benchmarks/speed/run_all.py --device cuda --precision bf16 --compile

See `trainformer bench --help` for the options; output: OUT/bench.json, OUT/bench.md, OUT/*.png.
"""

from __future__ import annotations

import sys

from trainformer.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
