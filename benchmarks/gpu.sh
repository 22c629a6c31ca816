#!/usr/bin/env bash
# The device script (issue 15): the CUDA benches and the CUDA tests in one go, about 5 minutes.
#
#   benchmarks/gpu.sh [OUT]          on a GPU machine, from the repo root
#   benchmarks/gpu.sh --cpu-smoke [OUT]   the same steps at tiny sizes on CPU (tests/test_bench.py)
#
# OUT (default $OUT, else results/bench-gpu) receives every JSON, each step's log, the pytest
# junit XML and summary.json. Installs nothing from the network: wheels under .whl/, if any,
# are installed offline (pip --no-index --no-deps) into $VISAE_SITE (default /tmp/site);
# otherwise it uses what is importable. Each step runs under `timeout`, within a budget of
# $VISAE_GPU_BUDGET seconds (default 300) for the whole run. A failing step does not stop the
# others; the exit status is non-zero if any step failed (a ratio below its goal is shown in
# the summary, not a failure). Extraction images: $VISAE_BENCH_DATASET (FORMAT:ROOT), else
# imagenet-sample from shared/data, else Fashion-MNIST, else a synthetic image folder.
set -u

smoke=0
if [ "${1:-}" = "--cpu-smoke" ]; then smoke=1; shift; fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
OUT_DIR=${1:-${OUT:-results/bench-gpu}}
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
BUDGET=${VISAE_GPU_BUDGET:-300}
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=$ROOT/.venv/bin/python
else PY=python3; fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
STEPS="$OUT_DIR/steps.tsv"
: > "$STEPS"
failed=0

# run NAME LIMIT_S CMD...: one step, its output in NAME.log, its status a line of steps.tsv
run() {
    local name=$1 limit=$2 left rc start why
    shift 2
    left=$((BUDGET - SECONDS - 5))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 10 ]; then
        printf '%s\tskipped\t0\tno time left in the %ss budget\n' "$name" "$BUDGET" >> "$STEPS"
        failed=1
        return
    fi
    echo "== $name (limit ${limit}s): $*"
    start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    rc=$?
    if [ "$rc" -eq 0 ]; then
        printf '%s\tok\t%s\t\n' "$name" "$((SECONDS - start))" >> "$STEPS"
    else
        [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && why="timed out after ${limit}s" || why="exit $rc"
        printf '%s\tfailed\t%s\t%s (see %s.log)\n' "$name" "$((SECONDS - start))" "$why" "$name" >> "$STEPS"
        tail -n 5 "$OUT_DIR/$name.log"
        failed=1
    fi
}

# bench NAME LIMIT_S BENCH ARGS...: `visae bench BENCH`, its JSON saved as NAME.json
bench() {
    local name=$1 limit=$2 which=$3
    shift 3
    rm -rf "$OUT_DIR/.$name"
    run "$name" "$limit" "$PY" -m visae.cli bench "$which" "$@" --out "$OUT_DIR/.$name"
    if [ -f "$OUT_DIR/.$name/$which.json" ]; then mv "$OUT_DIR/.$name/$which.json" "$OUT_DIR/$name.json"; fi
    rm -rf "$OUT_DIR/.$name"
}

if compgen -G ".whl/*.whl" > /dev/null; then
    SITE=${VISAE_SITE:-/tmp/site}
    run wheels 120 "$PY" -m pip install --no-index --no-deps --upgrade --quiet --target "$SITE" .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:$SITE"
fi

EXTRACT_IMAGES=$([ "$smoke" -eq 1 ] && echo 8 || echo 2048)
images() {  # the extraction bench's dataset, always something present
    local d
    if [ -n "${VISAE_BENCH_DATASET:-}" ]; then echo "$VISAE_BENCH_DATASET"; return; fi
    if [ "$smoke" -eq 0 ]; then
        for d in shared/data/imagenet-sample ../shared/data/imagenet-sample; do
            if [ -d "$d" ]; then echo "imagenet-sample:$(cd "$d" && pwd)"; return; fi
        done
    fi
    for d in resources/fashion-mnist /usr/share/datasets/fashion-mnist; do
        if [ -f "$d/train-images-idx3-ubyte.gz" ]; then echo "fashion-mnist:$(cd "$d" && pwd)"; return; fi
    done
    "$PY" - "$OUT_DIR/images" "$EXTRACT_IMAGES" <<'EOF'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
for i in range(max(64, int(sys.argv[2]))):  # JPEGs, as ImageNet's
    folder = Path(sys.argv[1]) / f"class{i % 2}"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(folder / f"{i:04d}.jpg", quality=90)
EOF
    echo "imagefolder:$OUT_DIR/images"
}
DATASET=$(images)
extract_precision=()
if "$PY" -m visae.cli bench extract --help 2>/dev/null | grep -q -- "--precision"; then
    extract_precision=(--precision auto)
fi

echo "visae device run: out $OUT_DIR, python $PY, budget ${BUDGET}s$([ "$smoke" -eq 1 ] && echo ', CPU smoke')"
# First the CUDA tests (correctness before speed), in the files that hold any (collecting every
# test file would need every optional package); on CPU they report themselves skipped.
mapfile -t cuda_files < <(grep -l "mark\.cuda" tests/test_*.py)
if [ "${#cuda_files[@]}" -gt 0 ]; then
    run pytest-cuda 70 "$PY" -m pytest -m cuda -rs -p no:cacheprovider --junitxml="$OUT_DIR/pytest-cuda.xml" \
        "${cuda_files[@]}"
else
    printf 'pytest-cuda\tfailed\t0\tno test file holds a CUDA test\n' >> "$STEPS"
    failed=1
fi

if [ "$smoke" -eq 1 ]; then
    tiny=(--d 16 --expansion 2 --batch 64 --k 4 --threads 1)
    bench train 60 train "${tiny[@]}" --device cpu
    bench loader 30 loader --batch-size 64 --images 64 --d-model 16
    bench loader-device 30 loader --batch-size 64 --images 64 --d-model 16 --device cpu
    bench extract 60 extract --model timm:vit_tiny_patch16_224 --image-size 32 --dataset "$DATASET" \
        --images 8 --batch-size 4 --workers 0 --device cpu "${extract_precision[@]}"
else
    # limits within the 300 s budget after the tests; extraction gets enough images (2,048, in
    # batches of 128) that its workers' start-up is not what it measures
    bench train 90 train --device cuda
    bench loader 25 loader
    bench loader-device 35 loader --device cuda --d-model 768 --batch-size 16384
    bench extract 70 extract --device cuda --dataset "$DATASET" --images "$EXTRACT_IMAGES" --batch-size 128 \
        "${extract_precision[@]}"
fi
"$PY" - "$OUT_DIR" <<'EOF'
"""The one-screen summary (also summary.json): each step's status, each ratio next to its goal."""
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])
steps = {}
for line in (out / "steps.tsv").read_text().splitlines():
    name, status, seconds, why = (line.split("\t") + [""] * 4)[:4]
    steps[name] = {"status": status, "seconds": int(seconds), "why": why}
print(f"\n== summary ({out})")
for name, step in steps.items():
    print(f"{name:15s} {step['status']:8s} {step['seconds']:4d}s  {step['why']}")
    path = out / f"{name}.json"
    if path.is_file():
        result = json.loads(path.read_text())
        step["json"] = path.name
        step["gpu"] = result.get("device", {}).get("gpu")
        print(f"    {name}.json, on {step['gpu'] or 'the CPU (no CUDA device)'}")
        step["ratios"] = {k: {"ratio": v, "goal": result["goals"][k], "met": result["meets_goals"][k]}
                          for k, v in result["ratios"].items()}
        for k, r in step["ratios"].items():
            print(f"    {k:28s} {r['ratio']:9.3f}  goal >= {r['goal']:<5g} {'met' if r['met'] else 'NOT MET'}")
        for k, v in sorted(result.get("informative_ratios", {}).items()):
            print(f"    {k:28s} {v:9.3f}  (informative, no goal)")
xml = out / "pytest-cuda.xml"
if xml.is_file():
    root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    steps.setdefault("pytest-cuda", {})["tests"] = counts
    print("    pytest -m cuda: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
(out / "summary.json").write_text(json.dumps(steps, indent=2) + "\n")
EOF
exit $failed
