"""Benchmark: wall time of `medscale demo` and its stages (generate, prep, train+eval).

Runs the default demo (2 CPU ranks through the deepspeed launcher) in a temporary directory.
The last output line is one JSON object of the figures.
"""

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo"
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "medscale.cli", "demo", "--out", str(out)], cwd=ROOT, check=True)
        wall = time.perf_counter() - t
        summary = json.loads((out / "demo_summary.json").read_text())
    figures = {
        "benchmark": "demo",
        "wall_s": round(wall, 1),
        **{k: round(v, 1) if isinstance(v, float) else v for k, v in summary.items()},
        "prep_share": round(summary["prep_s"] / wall, 3),
        "train_eval_share": round(summary["train_eval_s"] / wall, 3),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
