#!/usr/bin/env bash
# Same numbers before and after a refactor: run a small `jfe demo` with the code at REV and with this
# checkout, on one MiniBEIR build, and compare every model's TREC run file and the reports byte for byte.
#   benchmarks/demo_equivalence.sh 9c2652b [OUT]      (about 15 min on 2 cores)
set -euo pipefail
rev=${1:?usage: demo_equivalence.sh REV [OUT]}
here=$(pwd)
out=$(realpath -m "${2:-runs/equivalence}")
jfe="$here/.venv/bin/jfe"
rm -rf "$out" && mkdir -p "$out"
git worktree add -q --detach "$out/old-src" "$rev"
trap 'git worktree remove --force "$out/old-src"' EXIT
# fp32 by default: bf16 results depend on the batch, and the point is to compare the code. Revisions from before
# --precision read JFE_PRECISION instead; later ones ignore it.
precision=${PRECISION:-fp32}
export JFE_PRECISION=$precision
takes_precision() { "$@" demo --help 2>/dev/null | grep -q -- --precision; }
old() { (cd "$out/old-src" && PYTHONPATH="$PWD/src" "$jfe" "$@"); }
old data build-minibeir --out "$out/minibeir" --max-bases 60 >/dev/null
for side in old new; do
  run=(demo --data "$out/minibeir" --out "$out/$side" --stage1-steps 10 --stage2-steps 10)
  if [ "$side" = old ]; then
    if takes_precision old; then run+=(--precision "$precision"); fi
    old "${run[@]}"
  else
    "$jfe" "${run[@]}" --precision "$precision"
  fi
done
status=0
for f in $(cd "$out/old" && find eval -name run.trec | sort) report/local/report.md report/global/report.md; do
  if cmp -s "$out/old/$f" "$out/new/$f"; then echo "same $f"; else echo "DIFFERENT $f"; status=1; fi
done
exit $status
