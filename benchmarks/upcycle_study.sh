#!/usr/bin/env bash
# Up-training study (docs/results.md, "Up-training from a pretrained vanilla model"):
# pretrain a small vanilla Llama on Shakespeare, then up-train a Middle-Cycle N_r=3 recursive
# and an expert-choice MoR model from it with every init strategy for one short budget, and
# train both from scratch with the same recipe. Prints the table of final validation NLLs.
#
#   benchmarks/upcycle_study.sh                       # OUT=runs/upcycle-study PY=python STEPS=100
#   for s in 0 1 2; do SEED=$s benchmarks/upcycle_study.sh; done   # the table in docs/results.md
#
# SEED changes the up-training runs (data order, router init, the random strategy's draw)
# and the scratch baselines; the corpus and the pretrained vanilla model are shared.
# Reruns skip the finished parts (the corpus, the vanilla model, finished runs).
set -euo pipefail
OUT=${OUT:-runs/upcycle-study}
PY=${PY:-python}
STEPS=${STEPS:-100}
SEED=${SEED:-0}
SUFFIX=$([ "$SEED" = 0 ] && echo "" || echo "-seed$SEED")
STRATEGIES=${STRATEGIES:-"stepwise average lower upper random"}
ARCHS=${ARCHS:-"recursive mor"}
[ -f "$OUT/data/meta.json" ] || $PY -m mor prepare shakespeare --out "$OUT/data" --vocab-size 2048 --val-fraction 0.02
[ -d "$OUT/vanilla/checkpoints" ] || $PY -m mor train -c configs/upcycle/vanilla.yaml data="$OUT/data" out_dir="$OUT/vanilla"
run() {  # name, flags (before the overrides), overrides...
  local name=$1 flags=$2; shift 2
  [ -d "$OUT/$name/checkpoints" ] && return 0
  rm -rf "$OUT/$name"  # an interrupted run starts over
  $PY -m mor train $flags -c configs/upcycle/uptrain.yaml data="$OUT/data" out_dir="$OUT/$name" max_steps="$STEPS" \
    seed="$SEED" "$@" > "$OUT/$name.log" 2>&1
}
for arch in $ARCHS; do
  for s in $STRATEGIES; do
    run "$arch-$s$SUFFIX" "--init-from-hf $OUT/vanilla" model.architecture="$arch" init_strategy="$s"
  done
  run "$arch-scratch$SUFFIX" "" model.architecture="$arch"
done
$PY benchmarks/upcycle_table.py "$OUT"
