#!/usr/bin/env bash
# GPU checks for the inference engine (issue 10), one script, < 8 min on one H100 + 16 cores.
#
#   PYTHONPATH=$PWD bash benchmarks/gpu_check.sh            # on the GPU machine, from the repo root
#   PYTHONPATH=$PWD bash benchmarks/gpu_check.sh --small    # the same steps at tiny sizes on the CPU
#
# Steps, most important first, each under its own time limit so a slow one cannot eat the rest;
# every result goes to "$OUT" (default ./gpu_check_out): text logs and JSON.
#   0. environment: versions, nvidia-smi, which of volseg's imports are missing
#   1. pytest -m cuda (the GPU chain against the CPU and against MONAI)
#   2. speed at the goal size: configs/gpu_fullres.yaml's network (32..320, patch 128^3) on a synthetic
#      CT of 512x512x200 at 0.8x0.8x2.5 mm (plan spacing 1.6x1.6x2.5), 14 classes, untrained;
#      rows monai / exact / volseg / window, 3 alternated repeats
#   3. memory row: 512x512x300, 14 classes (plan spacing 1.5x1.5x2.0): volseg and monai, once each
#   4. agreement with a briefly trained model (needs ignite, tensorboard, scipy): phantoms; off unless T4=seconds
set -u
SMALL=0
[ "${1:-}" = "--small" ] && SMALL=1
PY="${PYTHON:-python3}"
THREADS="${THREADS:-0}"   # torch threads per benchmark run; 0 = torch's default (use 1 on a shared CPU)
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
BENCH="benchmarks/bench_inference.py"
if [ "$SMALL" = 1 ]; then
  DEV=cpu; SPEED="--shape 96 96 40 --features 4 8 --roi 32 32 16"; MEM="--shape 128 128 60 --features 4 8 --roi 32 32 16"
  TRAIN="--train-steps 4 --phantom-shape 64 64 48"; T1=120; T2=300; T3=200; T4=300; REP=1
else
  DEV=cuda; SPEED="--shape 512 512 200 --spacing 0.8 0.8 2.5 --target-spacing 1.6 1.6 2.5 --roi 128 128 128"
  MEM="--shape 512 512 300 --spacing 0.8 0.8 2.5 --target-spacing 1.5 1.5 2.0 --roi 128 128 128"
  TRAIN="--train-steps 200 --phantom-shape 128 128 80"; T1=90; T2="${T2:-220}"; T3="${T3:-80}"; T4="${T4:-0}"; REP=3
fi
step() { echo "== $1 ($(date -u +%T))" | tee -a "$OUT/summary.txt"; }

step "0 environment"
git log -1 --format="commit %h %s" 2>/dev/null | tee -a "$OUT/summary.txt"
{ nvidia-smi || true; "$PY" - <<'EOF'
import importlib, platform, sys
print("python", platform.python_version())
for m in ("torch", "monai", "nibabel", "SimpleITK", "ignite", "yaml", "scipy", "tqdm", "tensorboard"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as exc:  # report, do not stop: later steps say what they could not do
        print(m, "MISSING", type(exc).__name__, exc)
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
EOF
} > "$OUT/environment.txt" 2>&1
TIMEFORMAT="%R s"
for i in 1 2; do  # subprocess start-up (each benchmark row is a fresh process): import + CUDA init
  t=$( { time "$PY" -c "import torch, monai.transforms, volseg.inference.predictor; torch.zeros(1, device='$DEV')" >/dev/null 2>&1; } 2>&1 )
  echo "start-up run $i (import torch, monai, volseg; first tensor on $DEV): $t" | tee -a "$OUT/summary.txt"
done
cat "$OUT/environment.txt" | grep -E "MISSING|^cuda|^torch|^monai" | tee -a "$OUT/summary.txt"

step "1 pytest -m cuda"
timeout "$T1" "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_inference_engine.py tests/test_training.py > "$OUT/pytest_cuda.txt" 2>&1
echo "exit $?: $(tail -n 1 "$OUT/pytest_cuda.txt")" | tee -a "$OUT/summary.txt"

step "2 speed, goal size"
timeout "$T2" "$PY" "$BENCH" --device "$DEV" --threads "$THREADS" $SPEED --rows monai exact volseg window --repeat "$REP" --json "$OUT/speed.json" > "$OUT/speed.txt" 2>&1
echo "exit $?" | tee -a "$OUT/summary.txt"; grep -E "^\||lower bound" "$OUT/speed.txt" | tee -a "$OUT/summary.txt"

step "3 memory, 512x512x300 x 14 classes"
timeout "$T3" "$PY" "$BENCH" --device "$DEV" --threads "$THREADS" $MEM --classes 14 --rows volseg monai --repeat 1 --json "$OUT/memory.json" > "$OUT/memory.txt" 2>&1
echo "exit $?" | tee -a "$OUT/summary.txt"; grep -E "^\||lower bound" "$OUT/memory.txt" | tee -a "$OUT/summary.txt"

step "4 agreement, briefly trained model"
[ "$T4" = 0 ] && { echo "skipped (T4=0; agreement is measured on the CPU)" | tee -a "$OUT/summary.txt"; step "done"; exit 0; }
timeout "$T4" "$PY" "$BENCH" --device "$DEV" --threads "$THREADS" $TRAIN --rows monai exact volseg crop window overlap --repeat 1 --json "$OUT/trained.json" > "$OUT/trained.txt" 2>&1
echo "exit $?" | tee -a "$OUT/summary.txt"; grep -E "^\||lower bound" "$OUT/trained.txt" | tee -a "$OUT/summary.txt"
step "done"
