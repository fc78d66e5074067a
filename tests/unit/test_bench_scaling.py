"""The scaling model of bench/scaling.py: ZeRO traffic, ring costs, monotonic efficiency, overlap, and the
Goyal et al. 2017 reproduction. Pure arithmetic: no timm, no distributed run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "bench" / "scaling.py"


@pytest.fixture(scope="module")
def sc():
    spec = importlib.util.spec_from_file_location("bench_scaling", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_scaling"] = mod  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("bench_scaling", None)


def _vit_b(sc, **kw):
    return sc.Workload("vit_b_like", params=86_000_000, sample_s=1 / 4000, depth=12, **kw)


def _fabrics(sc):
    return [sc.Fabric("ib200", 450.0, 25.0), sc.Fabric("ib400", 450.0, 50.0)]


def test_zero_traffic_hand_counts(sc):
    P = 1000  # bf16: 2 bytes a gradient and a parameter
    assert sc.zero_traffic(P, 1) == sc.Traffic(rs_per_step=2000, ag_per_step=2000)
    assert sc.zero_traffic(P, 2) == sc.Traffic(rs_per_micro=2000, ag_per_step=2000)
    assert sc.zero_traffic(P, 3) == sc.Traffic(rs_per_micro=2000, ag_per_micro=4000)
    assert sc.zero_traffic(P, 0, grad_bytes=4) == sc.Traffic(rs_per_step=4000, ag_per_step=4000)
    # one GPU of 8 sends (n-1)/n of every buffer; 4 micro-batches per step
    assert sc.wire_bytes_per_gpu(sc.zero_traffic(P, 1), 8, accum=4) == pytest.approx(7 / 8 * 4000)
    assert sc.wire_bytes_per_gpu(sc.zero_traffic(P, 2), 8, accum=4) == pytest.approx(7 / 8 * (4 * 2000 + 2000))
    assert sc.wire_bytes_per_gpu(sc.zero_traffic(P, 3), 8, accum=4) == pytest.approx(7 / 8 * 4 * 6000)
    with pytest.raises(ValueError):
        sc.zero_traffic(P, 4)


def test_ring_costs(sc):
    S, n, gbs, a = 1e9, 8, 100.0, 5e-6
    assert sc.ring_time("all_reduce", S, n, gbs, a) == pytest.approx(2 * 7 * a + 2 * 7 / 8 * S / 100e9)
    assert sc.ring_time("reduce_scatter", S, n, gbs, 0.0) == pytest.approx(7 / 8 * S / 100e9)
    assert sc.ring_time("all_gather", S, 1, gbs, a) == 0.0
    fab = sc.Fabric("f", intra_gbs=400.0, inter_gbs=50.0, intra_alpha_s=0.0, inter_alpha_s=0.0)
    # 64 GPUs = 8 nodes: the node ring on S, then a ring of 8 nodes on S/8 per GPU
    assert sc.collective_time("reduce_scatter", S, 64, fab) == pytest.approx(7 / 8 * S / 400e9 + 7 / 8 * S / 8 / 50e9)


@pytest.mark.parametrize("buckets", [0, 1, 12])
def test_efficiency_falls_with_gpu_count(sc, buckets):
    w = _vit_b(sc, buckets=buckets)
    for fab in _fabrics(sc):
        for stage in (1, 2, 3):
            for overlap in (False, True):
                c = sc.efficiency_curve(w, stage, fab, micro=64, overlap=overlap)
                effs = [c[n]["eff"] for n in sc.GPU_COUNTS]
                assert all(0 < e <= 1 for e in effs)
                assert all(x >= y for x, y in zip(effs, effs[1:])), (stage, overlap, effs)
                assert c[8]["eff_vs_8"] == pytest.approx(1.0)


def test_overlap_never_lowers_efficiency(sc):
    for buckets in (0, 1, 4, 12):
        w = _vit_b(sc, buckets=buckets)
        for fab in _fabrics(sc):
            for stage in (0, 1, 2, 3):
                for n in (8, 64, 1024):
                    for micro, accum in ((1, 1), (32, 1), (128, 4)):
                        kw = dict(micro=micro, accum=accum)
                        no = sc.step_time(w, stage, n, fab, overlap=False, **kw)["eff"]
                        ov = sc.step_time(w, stage, n, fab, overlap=True, **kw)["eff"]
                        assert ov >= no - 1e-12, (buckets, fab.name, stage, n, micro, accum)


def test_accumulation_amortises_only_per_step_traffic(sc):
    w, fab = _vit_b(sc, buckets=12), sc.Fabric("ib200", 450.0, 25.0)
    e = {(s, k): sc.step_time(w, s, 1024, fab, micro=64, accum=k)["eff"] for s in (1, 2, 3) for k in (1, 8)}
    assert e[1, 8] > e[1, 1] and e[2, 8] > e[2, 1]
    assert e[3, 8] == pytest.approx(e[3, 1])  # ZeRO-3 pays all of its traffic every micro-batch


def test_min_global_batch_reaches_target(sc):
    w, fab = _vit_b(sc), sc.Fabric("ib400", 450.0, 50.0)
    r = sc.min_global_batch(w, 1, fab, 1024, micro_max=128, overlap=True)
    assert r["global_batch"] == 1024 * r["micro"] * r["accum"]
    assert sc.step_time(w, 1, 1024, fab, micro=r["micro"], accum=r["accum"], overlap=True)["eff"] >= 0.9


def test_goyal_2017_reproduced_within_5_points(sc):
    g = sc.goyal_reproduction()
    assert abs(g["modelled_eff_no_overlap"] - 0.90) <= 0.05
    assert g["modelled_eff_overlap"] >= g["modelled_eff_no_overlap"]
    assert g["published_eff_from_times"] == pytest.approx(0.906, abs=0.002)
