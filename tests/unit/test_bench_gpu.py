"""bench/gpu.py keeps running: its --smoke run on the CPU (every path at tiny size), and its GPU plan."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu.py"


def _last_json(args: list[str], timeout: float) -> tuple[dict, str]:
    r = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=subprocess_env(), capture_output=True,
                       text=True, timeout=timeout)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), out


def test_smoke_runs_every_row_on_the_cpu_and_ends_with_its_json_line():
    figures, out = _last_json(["--smoke"], timeout=240)
    assert figures["bench"] == "gpu" and figures["smoke"] is True
    assert figures["device"] == "cpu" and figures["datasheet_peak_tflops"] is None
    assert figures["matmul_peak_tflops"] > 0
    rows = figures["rows"]
    assert {r["status"] for r in rows} <= {"ok", "skipped"}, [r for r in rows if r["status"] == "error"]
    assert all(r["card"] == "cpu" for r in rows)
    ok = [r for r in rows if r["status"] == "ok"]
    names = {(r["name"], r["compile"]) for r in ok}
    for name in ("plain AMP bf16", "medscale bf16 ZeRO-2", "medscale fp32 ZeRO-2", "medscale bf16 ZeRO-2, real loader"):
        assert (name, False) in names, name
    assert ("plain AMP bf16 +compile", True) in names and ("medscale bf16 ZeRO-2 +compile", True) in names
    for r in ok:
        assert r["images_per_s"] > 0 and r["steps"] >= 1
        assert r["mfu_vs_measured"] is not None and r["mfu_vs_datasheet"] is None  # no datasheet peak for a CPU
        assert "peak_mem_gb" in r
    fp16 = [r for r in rows if r["precision"] == "fp16"]
    assert fp16 and all(r["status"] == "skipped" and "fp16 needs a GPU" in r["reason"] for r in fp16)
    loader = next(r for r in ok if r["source"] == "loader")
    assert loader["corrupt_samples"] == 0 and 0 <= loader["data_wait_frac"] <= 1
    assert figures["loader_vs_synthetic"] > 0
    assert set(figures["medscale_vs_plain"]) >= {"test_vit3 bf16", "test_vit3 bf16 compile"}
    assert set(figures["targets"]) == {"vit_large_bf16_mfu_vs_datasheet", "medscale_bf16_vs_plain_min",
                                       "loader_vs_synthetic"}
    assert "images/s" in out and "MFU sheet" in out  # the table came before the JSON line


def test_gpu_plan_fits_the_budget_and_runs_the_headline_rows():
    """The default GPU run, planned from an H200's measured peak without a GPU: ViT-L's eager rows and the
    loader row are in, and the rows the budget runs end inside it."""
    plan, _ = _last_json(["--plan-only", "--assume-peak-tflops", "790"], timeout=120)
    assert plan["plan_only"] and plan["estimate_s"] <= plan["budget_s"] < 360
    runs = {(r["model"], r["name"]) for r in plan["rows"] if r["runs"]}
    for name in ("plain AMP bf16", "medscale bf16 ZeRO-2", "medscale fp16 ZeRO-2"):
        assert ("vit_large_patch16_224", name) in runs and ("vit_base_patch16_224", name) in runs
    assert len(plan["rows"]) == 12  # 2 models x (plain, bf16, fp16) x (eager, compiled)
