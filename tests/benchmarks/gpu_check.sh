#!/usr/bin/env bash
# The GPU checks of retag and training, in one run of under 5 minutes (GPU time is scarce: a run and a
# rerun must fit in 15 minutes, machine start included). Each section runs with its own time cap and
# writes OUT/<section>.json as soon as it finishes, so a section that hangs or fails costs only itself.
#
#   bash tests/benchmarks/gpu_check.sh [--cpu-smoke] [--only "versions predictor ..."]
#
# OUT: $OUT when set (the device runner's folder that comes back), else /tmp/mumic-gpu-check/results.
# PYTHON: $PYTHON, else .venv/bin/python when present, else python3 (the GPU machine may have no venv and
# no package index: the versions section says what it found).
# --cpu-smoke: every section on the CPU at toy sizes, a dry run of the script itself (numbers meaningless).
set -u
cd "$(dirname "$0")/../.."

smoke=""
only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) smoke="--cpu-smoke" ;;
    --only) only="$2"; shift ;;
    *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

out="${OUT:-/tmp/mumic-gpu-check/results}"
work="${GPU_CHECK_WORK:-/tmp/mumic-gpu-check/work}"
mkdir -p "$out" "$work"
# a smoke run on a small shared CPU spends its time importing torch, not measuring: give it longer caps
scale="${GPU_CHECK_CAP_SCALE:-$([ -n "$smoke" ] && echo 8 || echo 1)}"
if [ -n "${PYTHON:-}" ]; then py="$PYTHON"; elif [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi

# section and its cap in seconds; caps add up to 300 s, and the sections usually take half of that
sections="versions:20 predictor:45 agreement:25 breakdown:25 decode:40 nvjpeg:25 retag:80 train:40"

started=$(date +%s)
failed=0
for item in $sections; do
  name="${item%%:*}"
  cap=$(( ${item##*:} * scale ))
  case " ${only:-$name} " in *" $name "*) ;; *) continue ;; esac
  t0=$(date +%s)
  timeout --kill-after=5 "$cap" "$py" tests/benchmarks/gpu_check.py "$name" --out "$out" --work "$work" $smoke \
    >"$out/$name.log" 2>&1
  rc=$?
  took=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ] && [ -s "$out/$name.json" ]; then
    echo "gpu_check: $name ok in ${took}s"
  else
    failed=$((failed + 1))
    why=$([ $rc -eq 124 ] || [ $rc -eq 137 ] && echo "over its ${cap}s cap" || echo "exit $rc")
    printf '{"section": "%s", "failed": "%s", "seconds": %s}\n' "$name" "$why" "$took" >"$out/$name.json"
    echo "gpu_check: $name FAILED ($why); last lines of $out/$name.log:"
    tail -n 5 "$out/$name.log" | sed 's/^/    /'
  fi
done
echo "gpu_check: done in $(( $(date +%s) - started ))s, $failed section(s) failed; results in $out"
exit $(( failed > 0 ))
