"""What a prep process pays before its first file: the import of `medscale prep`'s code, and the
memory each worker process holds.

Prep needs no torch (the layers import downwards only: `tests/unit/test_layers.py`); this measures
what that saves. Figures: the wall time of ``import medscale.prep.pipeline`` in a fresh interpreter
(median of --repeat), that interpreter's peak RSS, whether torch was imported, and the peak RSS of
each worker process of a real ``medscale prep --workers 2`` on a small synthetic corpus (sampled
every 20 ms). To compare two trees side by side, run it twice with PYTHONPATH pointing at each
tree's ``src``. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from medscale.demo import write_synthetic_corpus

IMPORT = ("import resource, sys, time; t = time.perf_counter(); import medscale.prep.pipeline; "
          "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "
          "'torch' in sys.modules)")


def import_cost(repeat: int) -> tuple[float, float, bool]:
    times, rss, torch = [], [], False
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", IMPORT], capture_output=True, text=True, check=True).stdout.split()
        times.append(float(out[0]))
        rss.append(float(out[1]))
        torch = torch or out[2] == "True"
    return statistics.median(times), statistics.median(rss), torch


def worker_rss(tmp: Path) -> tuple[list[float], float]:
    """Peak RSS (MB) of each worker process of a real prep, and its wall time."""
    labels = write_synthetic_corpus(tmp / "raw", patients=40, images_per_patient=4, size=64)
    recipe = Path(__file__).resolve().parents[1] / "data_prep" / "demo.yaml"
    env = {**os.environ, "MEDSCALE_PSEUDONYM_KEY": "00" * 32, "MEDSCALE_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "medscale.cli", "prep", str(tmp / "raw" / "dicom"), "--out", str(tmp / "out"),
           "--labels", str(labels), "--recipe", str(recipe), "--workers", "2", "--chunk-files", "8"]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak: dict[int, float] = {}
    parent = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            for child in parent.children():
                peak[child.pid] = max(peak.get(child.pid, 0.0), child.memory_info().rss / 2**20)
        except psutil.Error:
            pass
        time.sleep(0.02)
    if proc.returncode != 0:
        raise SystemExit(f"prep failed with exit code {proc.returncode}: {' '.join(cmd)}")
    return sorted(peak.values()), time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    seconds, rss, torch = import_cost(args.repeat)
    with tempfile.TemporaryDirectory() as tmp:
        workers, wall = worker_rss(Path(tmp))
    import medscale

    result = {"bench": "prep_startup", "machine": f"{platform.node()} {os.cpu_count()} cpus",
              "code": str(Path(medscale.__file__).parent), "import_s": round(seconds, 3), "import_rss_mb": round(rss),
              "imports_torch": torch, "worker_peak_rss_mb": [round(x) for x in workers], "prep_wall_s": round(wall, 1)}
    print(f"import medscale.prep.pipeline: {seconds:.2f} s, {rss:.0f} MB peak RSS, torch imported: {torch}")
    print(f"prep --workers 2 (160 files): worker peak RSS {[round(x) for x in workers]} MB, {wall:.1f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
