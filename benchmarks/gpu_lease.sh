#!/usr/bin/env bash
# One GPU lease's work for issue 21, as one command on the device machine (it must end inside
# the device's 10 minutes a command; a lease is about 15 minutes, start included):
#   0. the CUDA-only tests (images on the GPU train as when indexed on the CPU);
#   1. the classifier loop's levers on CIFAR-10, ResNet-32 alone (the images kept on the GPU and
#      augmented there, against indexed and augmented on the CPU): about a minute;
#   2. the CIFAR-10-LT r100 cells no earlier lease finished, side by side (parallel_cells.py),
#      their rows written to $OUT/rows.jsonl as they land, so a lease that ends early keeps them.
#
# Prepared here (the device machine is bare and offline): `make gpu-lease-prep` (the CIFAR-10 archive and the
# wheels the device lacks, into the git-ignored .gpu/); then the device tool: run(command="COMMIT=<git rev-parse HEAD> bash benchmarks/gpu_lease.sh",
# carry=[".gpu"], timeout_s=600), and here:
#   python benchmarks/parallel_cells.py --merge <files_at>/rows.jsonl --into benchmarks/results/bench/cifar10-gpu
#   synthaug bench cifar10-gpu --out benchmarks/results/bench/cifar10-gpu --report-only
#   cat <files_at>/speed.jsonl >> benchmarks/results/speed.jsonl; python benchmarks/speed.py --parts classifier
#   (nothing left to run here: it rewrites the speed table), python benchmarks/tables.py
set -uo pipefail
: "${OUT:?OUT must name the folder that comes back}"
: "${COMMIT:?COMMIT must name the commit this tree is (the device copy may carry an older .git)}"
BUDGET=${BUDGET:-570}  # seconds this command may take (the device's limit is 600)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if ls .gpu/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}
export SYNTHAUG_CIFAR10=${SYNTHAUG_CIFAR10:-$PWD/.gpu/cifar10-jpg.tar.gz}
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader

# 0. the CUDA-only tests (seconds; where pytest is installed)
timeout 90 $PY -m pytest -q -p no:cacheprovider tests/test_train.py -k gpu 2>&1 | tail -3 | tee "$OUT/tests.log"

# 1. the loop's levers: this machine's new rows of benchmarks/results/speed.jsonl come back, at $COMMIT
before=$(wc -l < benchmarks/results/speed.jsonl)
timeout 150 $PY benchmarks/speed.py --parts classifier --dataset cifar10 --models resnet32 \
  --classifier-levers default "data on the CPU" 2>&1 | tee "$OUT/speed.log"
tail -n +$((before + 1)) benchmarks/results/speed.jsonl \
  | python3 -c "import json, sys; [print(json.dumps({**json.loads(l), 'commit': sys.argv[1]})) for l in sys.stdin]" "$COMMIT" \
  > "$OUT/speed.jsonl"

# 2. the cells left, in what remains of the budget: no cell starts in its last 2.5 minutes, and
# running cells stop 1 minute before its end (their rows are lost; the next lease runs them again)
left=$((BUDGET - SECONDS))
minutes=$(python3 -c "print(round(($left - 150) / 60, 2))")
stop=$(python3 -c "print(round(($left - 60) / 60, 2))")
echo "$left s left: cells start for $minutes minutes, stop at $stop"
$PY benchmarks/parallel_cells.py cifar10-gpu --setting "CIFAR-10-LT r100" \
  --skip benchmarks/results/bench/cifar10-gpu/results.jsonl --alone --workers 12 \
  --minutes "$minutes" --stop "$stop" --last oracle --out /tmp/cells --export "$OUT/rows.jsonl" --commit "$COMMIT" \
  2>&1 | tee "$OUT/cells.log"
