#!/usr/bin/env bash
# One GPU lease's work for issue 21, as one command on the device machine (it must end inside
# the device's 10 minutes a command; a lease is about 15 minutes, start included):
#   1. the classifier loop's levers on CIFAR-10, ResNet-32 alone (the images kept on the GPU and
#      augmented there, against indexed and augmented on the CPU): about a minute;
#   2. the CIFAR-10-LT r100 cells no earlier lease finished, side by side (parallel_cells.py),
#      their rows written to $OUT/rows.jsonl as they land, so a lease that ends early keeps them.
#
# Prepared here (the device machine is bare and offline), in the repository's root:
#   mkdir -p .gpu && cp ../shared/data/cifar10-jpg.tar.gz .gpu/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .gpu diffusers==0.42.1 importlib_metadata   # what the device lacks
#   echo /.gpu/ >> .git/info/exclude
# then the device tool: run(command="COMMIT=<git rev-parse HEAD> bash benchmarks/gpu_lease.sh",
# carry=[".gpu"], timeout_s=600), and here:
#   python benchmarks/parallel_cells.py --merge <files_at>/rows.jsonl --into benchmarks/results/bench/cifar10-gpu
#   synthaug bench cifar10-gpu --out benchmarks/results/bench/cifar10-gpu --report-only
#   cat <files_at>/speed.jsonl >> benchmarks/results/speed.jsonl; python benchmarks/tables.py
set -uo pipefail
: "${OUT:?OUT must name the folder that comes back}"
: "${COMMIT:?COMMIT must name the commit this tree is (the device copy may carry an older .git)}"
MINUTES=${MINUTES:-6.5}  # no cell starts after this; running cells stop at MINUTES + 1.5
export PYTHONUNBUFFERED=1
if ls .gpu/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}
export SYNTHAUG_CIFAR10=${SYNTHAUG_CIFAR10:-$PWD/.gpu/cifar10-jpg.tar.gz}
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader

# 1. the loop's levers (rows in benchmarks/results/speed.jsonl, a copy comes back)
timeout 150 python3 benchmarks/speed.py --parts classifier --dataset cifar10 --models resnet32 \
  --classifier-levers default "data on the CPU" 2>&1 | tee "$OUT/speed.log"
grep -v '"device": "CPU"' benchmarks/results/speed.jsonl > "$OUT/speed.jsonl" || true  # this machine's rows

# 2. the cells left
stop=$(python3 -c "print($MINUTES + 1.5)")
python3 benchmarks/parallel_cells.py cifar10-gpu --setting "CIFAR-10-LT r100" \
  --skip benchmarks/results/bench/cifar10-gpu/results.jsonl --alone --workers 12 \
  --minutes "$MINUTES" --stop "$stop" --last oracle --out /tmp/cells --export "$OUT/rows.jsonl" --commit "$COMMIT" \
  2>&1 | tee "$OUT/cells.log"
