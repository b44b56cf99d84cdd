#!/bin/sh
# Runs two vpsci-bench binaries alternately in one boot of the nested machine:
#   ab.sh BEFORE AFTER ROUNDS FILTER
# Each round runs both (order alternating by round), one bench round each.
before=$1; after=$2; rounds=$3; filter=$4
r=0
while [ $r -lt $rounds ]; do
  if [ $((r % 2)) -eq 0 ]; then order="before after"; else order="after before"; fi
  for which in $order; do
    if [ $which = before ]; then bin=$before; else bin=$after; fi
    echo "AB-RUN $which $r"
    $bin --rounds 1 --filter "$filter" 2>&1 | grep -E '^(BENCH-SAMPLE|BENCH-FAIL)' | sed "s/^/AB-$which-$r /"
  done
  r=$((r + 1))
done
echo AB-DONE
