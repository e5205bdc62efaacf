#!/usr/bin/env bash
# Records the traces and outcomes of a fixed set of simulator scenarios × seeds into DIR,
# so a refactor can be checked byte for byte: run it before and after, then `diff -r`.
#   scripts/traces.sh DIR [N4_SIM_BINARY]
set -euo pipefail
out=${1:?usage: scripts/traces.sh DIR [n4-sim binary]}
sim=${2:-target/release/n4-sim}
mkdir -p "$out"
for nat in seq seq-down random preserving cone full-cone blocks; do
  for strategy in v1 predict; do
    for lambda in 0 400; do
      for seed in 1 2 3 4 5; do
        name="${nat}_${strategy}_l${lambda}_s${seed}"
        "$sim" run --nat "$nat" --seed "$seed" --lambda "$lambda" --strategy "$strategy" \
          --max-rounds 3 --time-limit-s 20 --packets --out "$out/$name.trace" >/dev/null 2>&1 \
          || echo "run failed: $name" >>"$out/failures"
      done
    done
  done
done
# Outcomes over many seeds (the sweep's table), one file per NAT pair.
for nat in seq blocks random/preserving random/seq blocks/preserving; do
  "$sim" sweep --nat "$nat" --strategy v1,predict --lambda 0,400 --seeds 300 --max-rounds 3 \
    --time-limit-s 20 --csv "$out/sweep-${nat//\//-}.csv" --jobs 2 >/dev/null 2>&1 \
    || echo "sweep failed: $nat" >>"$out/failures"
done
ls "$out" | wc -l
