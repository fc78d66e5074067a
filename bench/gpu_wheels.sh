#!/usr/bin/env bash
# Prepare, on this machine, every wheel the GPU machine needs to run bench/gpu.py (and medscale).
#
# The GPU machine (docs: /work/shared/docs/environment.md, "The GPU machine") has CPython 3.12 on
# manylinux x86_64 with torch 2.11, timm, torchvision, numpy, pyyaml, tabulate, safetensors, einops,
# msgpack, ninja, psutil, py-cpuinfo, packaging, tqdm, filelock, pillow, matplotlib, httpx, rich,
# threadpoolctl and no network. Missing there, and put into bench/wheels/ here (gitignored):
#   deepspeed           built from its sdist with DS_BUILD_OPS=0 (pure Python; ops JIT-build there)
#   hjson, pydantic, pydantic-core, annotated-types, typing-inspection, typing-extensions
#                       deepspeed's needs that the machine lacks (typing-extensions: pydantic wants
#                       a newer one than torch brings)
#   webdataset, braceexpand, pydicom, zstandard, blosc2, ndindex, numexpr
#                       medscale's data path and its codecs (cp312 binaries)
#   medscale            a wheel of this checkout
# Not carried: wandb (benchmarks run with logging.wandb=false; medscale imports it only when on).
# Versions are the ones installed in this venv (what medscale is tested with here).
#
# Usage (here):   bash bench/gpu_wheels.sh            # about 30 s; prints the set and its size
# Then there:     bash bench/gpu_device.sh            # installs them and runs bench/gpu.py
# (by hand there: python3 -m pip install --no-index --no-deps --target /tmp/site bench/wheels/*.whl;
#  PYTHONPATH=/tmp/site:src python3 bench/gpu.py). The device tool carries bench/wheels when a run
# names it in `carry` (64 MiB at most with the working tree).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
OUT=${OUT_DIR:-$ROOT/bench/wheels}
TARGET_PY=3.12

BINARY=(hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions
        webdataset braceexpand pydicom zstandard blosc2 ndindex numexpr)

version_here() {  # the version installed in this venv, empty if none
  "$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$1"
}

# pip matches manylinux tags exactly: name every glibc level up to the machine's (Ubuntu 24.04: 2.39).
PLATFORMS=(--platform manylinux1_x86_64 --platform manylinux2014_x86_64)
for n in $(seq 5 39); do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
TARGET=(--python-version "$TARGET_PY" --implementation cp --abi cp312 --abi abi3 --abi none "${PLATFORMS[@]}")

rm -rf "$OUT"
mkdir -p "$OUT"
specs=()
for name in "${BINARY[@]}"; do
  v=$(version_here "$name")
  specs+=("$name${v:+==$v}")
done
echo "downloading for CPython $TARGET_PY manylinux x86_64: ${specs[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: "${TARGET[@]}" -d "$OUT" "${specs[@]}"

ds=$(version_here deepspeed)
echo "building deepspeed${ds:+ $ds} from its sdist (DS_BUILD_OPS=0: no ops prebuilt; they JIT-build on the GPU)"
# --no-build-isolation: its setup.py imports torch, which this venv has (an isolated build would fetch one).
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-cache-dir --no-deps --no-build-isolation --no-binary deepspeed \
  -w "$OUT" "deepspeed${ds:+==$ds}"

echo "building the medscale wheel from this checkout"
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
# A copy, so that the build leaves no build/ or egg-info in the checkout.
cp -r "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/src" "$src/"
find "$src" -name __pycache__ -prune -exec rm -rf {} +
"$PY" -m pip wheel -q --no-cache-dir --no-deps --no-build-isolation -w "$OUT" "$src"

echo
echo "checking that the set is complete: resolve medscale for CPython $TARGET_PY from these wheels plus"
echo "placeholders for what the GPU machine already has"
"$PY" - "$OUT" "${TARGET[@]}" <<'EOF'
"""Resolve medscale with its dependencies from bench/wheels and placeholder wheels standing for the
packages the GPU machine has (KINDS.md's list, 2026-11-17), offline. A name pip still misses is
neither carried nor there: it is added as a placeholder, reported, and the resolution retried."""
import json, re, subprocess, sys, tempfile, zipfile
from pathlib import Path

out, target = Path(sys.argv[1]), sys.argv[2:]
THERE = {"torch": "2.11.0", "torchvision": "0.26.0", "numpy": "2.5.2", "safetensors": "0.8.0", "triton": "3.6.0"}
# Names on the GPU machine (device/KINDS.md); versions unknown there are planned as 999.
THERE_NAMES = """accelerate einops filelock fsspec huggingface-hub jinja2 matplotlib msgpack networkx ninja packaging
pillow psutil py-cpuinfo pyyaml regex requests rich safetensors sympy tabulate threadpoolctl timm tqdm httpx
httpcore h11 anyio idna certifi charset-normalizer urllib3 markdown-it-py mdurl pygments protobuf six
python-dateutil pyparsing kiwisolver cycler fonttools contourpy mpmath markupsafe click setuptools""".split()
NOT_CARRIED = {"wandb": "benchmarks run with logging.wandb=false; medscale imports wandb only when it is on"}


def placeholder(folder: Path, name: str, version: str) -> None:
    dist = f"{re.sub(r'[-.]+', '_', name)}-{version}"
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as z:
        z.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: gpu_wheels\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}.dist-info/RECORD", "")


with tempfile.TemporaryDirectory() as tmp:
    there = Path(tmp) / "there"
    there.mkdir()
    for name in set(THERE_NAMES) | set(THERE):
        placeholder(there, name, THERE.get(name, "999"))
    gaps: dict[str, str] = {}
    for _ in range(20):
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-index", "--quiet",
               "--find-links", str(out), "--find-links", str(there), "--only-binary=:all:", *target,
               "--target", str(Path(tmp) / "site"), "--report", str(Path(tmp) / "report.json"), "medscale"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode == 0:
            break
        m = re.search(r"No matching distribution found for ([A-Za-z0-9_.\-]+)", r.stderr)
        if not m:
            sys.exit("pip could not resolve the set:\n" + r.stderr[-3000:])
        name = m.group(1)
        gaps[name] = NOT_CARRIED.get(name, "MISSING: neither carried nor on the GPU machine")
        placeholder(there, name, "999")
    else:
        sys.exit("too many missing packages: " + ", ".join(gaps))
    report = json.loads((Path(tmp) / "report.json").read_text())
    carried = sorted(f"{i['metadata']['name']} {i['metadata']['version']}" for i in report["install"]
                     if not i["download_info"]["url"].startswith(there.as_uri()))
    print("resolved from bench/wheels:", ", ".join(carried))
    for name, why in gaps.items():
        print(f"not carried: {name} ({why})")
    missing = [n for n, why in gaps.items() if why.startswith("MISSING")]
    unused = sorted({p.name.split("-")[0].lower().replace("_", "-") for p in out.glob("*.whl")}
                    - {c.split()[0].lower().replace("_", "-") for c in carried})
    if unused:
        print("carried but not needed by medscale's resolution:", ", ".join(unused))
    if missing:
        sys.exit(f"incomplete: {', '.join(missing)}")
EOF

echo
ls -l "$OUT"
bytes=$(du -cb "$OUT"/*.whl | tail -1 | cut -f1)
echo "bench/wheels: $(ls "$OUT"/*.whl | wc -l) wheels, $bytes bytes ($(( bytes / 1048576 )) MiB; the device tool carries 64 MiB with the working tree)"
