#!/usr/bin/env bash
# The prepared GPU check (docs/benchmarks.md, "GPU (H200)"): one script that proves the CUDA
# path and measures the paper's protocols, writing everything it measures to one directory.
#
#   scripts/gpu_check.sh [--smoke] [--only STEP,STEP...] [--budget SECONDS] [OUT_DIR]
#   (OUT_DIR defaults to $OUT, else ./gpu-check)
#
# Full mode (needs CUDA; each step bounded by its own timeout, and all of them by --budget,
# default 570 s: a step starts only with 20 s left and gets at most what is left):
#   1. tests: tests/test_devices.py on CUDA: model vs HF Llama and vs the slow reference (fp32
#      and bf16), cached vs uncached decoding, engine batch invariance (fp32, bf16 KV pool),
#      CUDA-graph decode vs eager launches, training resume, the bf16 router-ranking check;
#   2. bench_infer: `mor bench infer` with the paper's protocol at the 360M shape (MoR
#      N_r=2/3/4 vs vanilla, batch 32 and the memory-matched batch, vanilla vs
#      transformers.generate), decode from CUDA graphs;
#   3. bench_infer_eager: the batch-32 comparison again with eager launches (no graphs);
#   4. bench_train / bench_train_compile: `mor bench train` at the 360M shape, bf16, eager and
#      torch.compile (step time, tokens/s, MFU against the measured bf16 matmul peak, memory);
#   5. prepare + fsdp2: a one-step FSDP2 run under torchrun on the single GPU (world size 1).
# --only runs the named steps alone (tests, bench_infer, bench_infer_eager, bench_infer_profile,
# bench_train, bench_train_compile, fsdp2; bench_infer_profile, the per-phase profile with
# the roofline prediction, runs only when named).
# --smoke runs the same steps on the CPU with tiny shapes (CI runs it: tests/test_gpu_check.py).
#
# Nothing is installed from the network. The project runs from this source tree (PYTHONPATH);
# Python packages missing on the machine are installed from ./.gpu-wheels if that folder
# exists (fill it beforehand with `pip download -d .gpu-wheels --only-binary=:all:
# --python-version X.Y NAME ...` and carry it along), into a private folder of OUT_DIR.
#
# Outputs in OUT_DIR: summary.json (one record per step: status, seconds, the step's final
# JSON line), summary.md (the human-readable tables), logs.tar.gz (every step's full log).
# The exit code is 0 when every step passed.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SMOKE=0
OUT_DIR=""
ONLY=""
BUDGET=570
ALL_STEPS="tests bench_infer bench_infer_eager bench_infer_profile bench_train bench_train_compile fsdp2"
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --only) shift; ONLY=",${1:-},"
            for s in ${1//,/ }; do
              case " $ALL_STEPS " in *" $s "*) ;; *) echo "gpu_check: unknown step $s (valid: $ALL_STEPS)" >&2; exit 2 ;; esac
            done ;;
    --budget) shift; BUDGET="${1:-}"
              [[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "gpu_check: --budget needs whole seconds, got '$BUDGET'" >&2; exit 2; } ;;
    -h|--help) sed -n 2,36p "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) echo "gpu_check: unknown option $1 (valid: --smoke, --only, --budget, --help)" >&2; exit 2 ;;
    *) OUT_DIR="$1" ;;
  esac
  shift
done
# wanted STEP: whether to run STEP (--only, else every step but the optional profile)
wanted() {
  if [ -n "$ONLY" ]; then [[ "$ONLY" == *",$1,"* ]]; else [ "$1" != bench_infer_profile ]; fi
}
OUT_DIR="${OUT_DIR:-${OUT:-$PWD/gpu-check}}"
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
W="$OUT_DIR/work"   # scratch: prepared data, runs, logs (logs are archived at the end)
LOGS="$W/logs"
rm -rf "$W" && mkdir -p "$LOGS"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
cd "$ROOT"
START=$(date +%s)
: > "$W/steps.jsonl"

# ---------------------------------------------------------------- helpers
# step NAME TIMEOUT_S CMD...: runs CMD with a timeout, logs it, records status and last JSON line.
step() {
  local name="$1" limit="$2"; shift 2
  local log="$LOGS/$name.log" t0 rc status left
  left=$(( BUDGET - ($(date +%s) - START) - 15 ))
  if [ "$left" -lt 20 ]; then
    echo "== $name: skipped, ${left}s of the budget left" | tee -a "$LOGS/commands.txt"
    echo "skipped: the budget of ${BUDGET}s was spent" > "$log"
    status=skipped; rc=0; t0=$(date +%s.%N)
  else
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit}s): $*" | tee -a "$LOGS/commands.txt"
    t0=$(date +%s.%N)
    timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$log" 2>&1
    rc=$?
    case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
  fi
  "$PY" - "$name" "$status" "$rc" "$t0" "$log" "$*" >> "$W/steps.jsonl" <<'PYEOF'
import json, sys, time
name, status, rc, t0, log, cmd = sys.argv[1:]
last = None
lines = [l for l in open(log, errors="replace").read().splitlines() if l.strip()]
tail = lines[-1][:300] if lines else ""
for line in open(log, errors="replace").read().splitlines()[::-1]:
    line = line.strip()
    if line.startswith("{") and line.endswith("}"):
        try:
            last = json.loads(line)
            break
        except ValueError:
            pass
print(json.dumps({"step": name, "status": status, "rc": int(rc), "seconds": round(time.time() - float(t0), 1),
                  "command": cmd, "result": last, "tail": tail}))
PYEOF
  echo "   -> $status (rc $rc), log: $log"
}

# ---------------------------------------------------------------- environment
{
  echo "date: $(date -u +%FT%TZ)"; echo "mode: $([ $SMOKE = 1 ] && echo smoke || echo full)"
  echo "git: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" - <<'PYEOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "| bf16", torch.cuda.is_bf16_supported())
for m in ("numpy", "yaml", "tokenizers", "safetensors", "tqdm", "transformers", "pytest", "datasets", "tensorboard"):
    try:
        mod = importlib.import_module(m)
        print(f"{m} {getattr(mod, '__version__', '?')}")
    except Exception as e:
        print(f"{m} MISSING ({type(e).__name__})")
PYEOF
} > "$LOGS/env.txt" 2>&1
cat "$LOGS/env.txt"
if grep -q "MISSING" "$LOGS/env.txt" && [ -d "$ROOT/.gpu-wheels" ]; then
  echo "installing missing packages from .gpu-wheels (no network)"
  "$PY" -m pip install -q --no-index --find-links "$ROOT/.gpu-wheels" --target "$W/site" \
      $(grep MISSING "$LOGS/env.txt" | awk '{print $1}' | sed 's/^yaml$/pyyaml/') >> "$LOGS/env.txt" 2>&1
  export PYTHONPATH="$PYTHONPATH:$W/site"
fi
if [ $SMOKE = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible (use --smoke for the CPU run)" >&2
  exit 2
fi

# ---------------------------------------------------------------- the steps
if [ $SMOKE = 1 ]; then
  DEV=cpu
  TRAIN_SHAPE=(--config configs/bench.yaml model.hidden_size=64 model.intermediate_size=128
               model.num_attention_heads=4 model.num_key_value_heads=2 model.vocab_size=512
               model.num_hidden_layers=8 seq_len=64 batch_size=2 device=cpu dtype=fp32)
  TRAIN_STEPS=(--steps 1 --rounds 1 --warmup 1)
  INFER=(--device cpu --dtype fp32 --preset tiny --batch 4 --vanilla-max-batch 4
         --mean-len 8 --requests-per-slot 1 --calib-seqs 2 --profile-steps 2)
  RECURSIONS=(2 3); RECURSIONS_EAGER=(3)
  FSDP_DEV=cpu; FSDP_DTYPE=fp32; VOCAB=512; COMPILE_MODELS=vanilla  # inductor on CPU compiles slowly
  LIMIT_TEST=300; LIMIT_TRAIN=400; LIMIT_TRAIN_COMPILE=400; LIMIT_INFER=120; LIMIT_INFER_EAGER=120; LIMIT_FSDP=120
  [ "$BUDGET" = 570 ] && BUDGET=1500
else
  DEV=cuda
  TRAIN_SHAPE=(--config configs/paper/vanilla-360m.yaml seq_len=2048 batch_size=16 device=cuda dtype=bf16)
  TRAIN_STEPS=(--steps 3 --rounds 2 --warmup 2)
  INFER=(--device cuda --dtype bf16 --preset smollm-360m --batch 32 --mean-len 256 --requests-per-slot 1)
  RECURSIONS=(2 3 4); RECURSIONS_EAGER=(2 4)
  FSDP_DEV=cuda; FSDP_DTYPE=bf16; VOCAB=2048; COMPILE_MODELS=vanilla,mor-expert
  LIMIT_TEST=100; LIMIT_TRAIN=90; LIMIT_TRAIN_COMPILE=150; LIMIT_INFER=240; LIMIT_INFER_EAGER=90; LIMIT_FSDP=40
fi

# 1. tests on every device (CUDA cases included when CUDA is there)
wanted tests && step tests "$LIMIT_TEST" "$PY" -m pytest -q -p no:cacheprovider tests/test_devices.py

# 2. generation throughput with the paper's protocol (decode from CUDA graphs on CUDA), then
#    the batch-32 comparison with eager launches, then (only when named) the per-phase profile
wanted bench_infer && step bench_infer "$LIMIT_INFER" "$PY" -m mor bench infer "${INFER[@]}" \
    --recursions "${RECURSIONS[@]}" --hf first
wanted bench_infer_eager && step bench_infer_eager "$LIMIT_INFER_EAGER" "$PY" -m mor bench infer "${INFER[@]}" \
    --recursions "${RECURSIONS_EAGER[@]}" --skip-max --hf none --cuda-graphs off
wanted bench_infer_profile && step bench_infer_profile "$LIMIT_INFER" "$PY" -m mor bench infer "${INFER[@]}" \
    --recursions "${RECURSIONS_EAGER[-1]}" --skip-max --hf none --profile

# 3. training throughput, eager then compiled (compile for the two headline models only)
wanted bench_train && step bench_train "$LIMIT_TRAIN" "$PY" -m mor bench train "${TRAIN_SHAPE[@]}" "${TRAIN_STEPS[@]}" \
    --models vanilla,recursive,mor-expert,mor-token,mor-expert-nr2 --nr 3

# 4. one FSDP2 step under torchrun (world size 1) on a small corpus made from the docs
if wanted fsdp2; then
  mkdir -p "$W/corpus" && cat "$ROOT"/docs/*.md "$ROOT"/README.md > "$W/corpus/docs.txt"
  step prepare 60 "$PY" -m mor prepare "$W/corpus" --out "$W/data" --vocab-size "$VOCAB"
  step fsdp2 "$LIMIT_FSDP" "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m mor train \
      --config configs/demo.yaml data="$W/data" out_dir="$W/fsdp-run" parallel=fsdp2 device="$FSDP_DEV" \
      dtype="$FSDP_DTYPE" max_steps=2 batch_size=2 seq_len=64 eval_every=0 ckpt_every=0 num_samples=0 \
      tensorboard=false progress=false overwrite=true
fi

# 5. compiled training last: compiling takes the longest and matters least to the other steps
wanted bench_train_compile && step bench_train_compile "$LIMIT_TRAIN_COMPILE" "$PY" -m mor bench train \
    "${TRAIN_SHAPE[@]}" compile=true "${TRAIN_STEPS[@]}" --models "$COMPILE_MODELS" --nr 3 --no-memory

# ---------------------------------------------------------------- summary
"$PY" - "$W/steps.jsonl" "$OUT_DIR" "$LOGS" "$SMOKE" "$START" <<'PYEOF'
import json, sys, time
from pathlib import Path
steps_file, out, logs, smoke, start = sys.argv[1:]
steps = [json.loads(l) for l in Path(steps_file).read_text().splitlines() if l.strip()]
ok = all(s["status"] == "ok" for s in steps)
summary = {"mode": "smoke" if smoke == "1" else "full", "ok": ok, "seconds": round(time.time() - float(start), 1),
           "environment": Path(logs, "env.txt").read_text(), "steps": steps}
Path(out, "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
md = [f"# gpu_check ({summary['mode']}): {'all steps passed' if ok else 'SOME STEPS FAILED'}, "
      f"{summary['seconds']} s", "", "```", summary["environment"].strip(), "```", ""]
for s in steps:
    md += [f"## {s['step']}: {s['status']} ({s['seconds']} s)", "", f"`{s['command']}`", "", "```"]
    lines = Path(logs, s["step"] + ".log").read_text(errors="replace").splitlines()
    md += [l for l in lines if not (l.startswith("{") and l.endswith("}"))][-45:]
    md += ["```", ""]
Path(out, "summary.md").write_text("\n".join(md))
print(json.dumps({"gpu_check": summary["mode"], "ok": ok, "seconds": summary["seconds"],
                  "steps": {s["step"]: s["status"] for s in steps}}))
sys.exit(0 if ok else 1)
PYEOF
rc=$?
tar -czf "$OUT_DIR/logs.tar.gz" -C "$W" logs 2>/dev/null
[ $SMOKE = 1 ] || rm -rf "$W"   # keep the device's OUT small: summary + logs archive only
exit $rc
