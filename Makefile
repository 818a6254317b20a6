# Two commands do all the set-up on a fresh machine:
#   make demo   creates .venv, installs synthaug, runs the main job on real data
#   make test   creates .venv, installs synthaug with test extras, runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.synthaug-installed
# torch from this pin installs from the machine's wheel cache in about a minute; see README.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-slow bench-smoke bench-longtail bench-levers bench-generator-levers bench-coloured-generator bench-coloured-filter bench-fewshot bench-ssl bench-targeted bench-tables bench-speed bench-sampler bench-selection bench-executors gpu-lease-prep lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/synthaug run configs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# the method benchmarks are synthaug bench suites (configs/bench/), each resumable in its folder
bench-smoke: $(STAMP)
	$(BIN)/synthaug bench smoke

bench-longtail: $(STAMP)
	$(BIN)/synthaug bench longtail-small --out benchmarks/results/bench/longtail-small

# issue 21's levers (configs/bench/longtail.yaml): hours on a CPU, resumable
bench-levers: $(STAMP)
	$(BIN)/synthaug bench longtail --out benchmarks/results/bench/longtail

# issue 21, item 3: the generator's tail levers judged by their images (about 40 minutes on a CPU, resumable)
bench-generator-levers: $(STAMP)
	$(BIN)/python benchmarks/generator_levers.py

# issue 21, item 6: the coloured generator judged cell by cell (digit and colour read apart; minutes, resumable)
bench-coloured-generator: $(STAMP)
	$(BIN)/python benchmarks/coloured_generator.py
	$(BIN)/python benchmarks/coloured_generator.py --agreement 0.99 --variants "2400 steps, Min-SNR 5, cells sqrt"

# issue 21, item 6: what the agreement filter keeps of the coloured generator's images, judged the same way (after
# the filter's bench rows; minutes, resumable)
bench-coloured-filter: $(STAMP)
	$(BIN)/python benchmarks/coloured_filter.py
	$(BIN)/python benchmarks/coloured_filter.py --agreement 0.99

bench-fewshot: $(STAMP)
	$(BIN)/synthaug bench fewshot-small --out benchmarks/results/bench/fewshot-small

# issue 19: FixMatch, DPT and generation on top of semi-supervised training (configs/bench/fewshot.yaml):
# hours on a CPU, resumable
bench-ssl: $(STAMP)
	$(BIN)/synthaug bench fewshot --out benchmarks/results/bench/fewshot

bench-targeted: $(STAMP)
	$(BIN)/synthaug bench targeted-small --out benchmarks/results/bench/targeted-small

bench-tables: $(STAMP)
	$(BIN)/python benchmarks/tables.py

bench-speed: $(STAMP)
	$(BIN)/python benchmarks/speed.py

bench-sampler: $(STAMP)
	$(BIN)/python benchmarks/sampler.py

bench-executors: $(STAMP)
	$(BIN)/python benchmarks/executors.py

bench-selection: $(STAMP)
	$(BIN)/python benchmarks/selection.py

# what benchmarks/gpu_lease.sh carries to the bare, offline device machine (.gpu/, git-ignored): the CIFAR-10
# archive and the wheels the device lacks; then run it with the device tool (the script's header says how)
gpu-lease-prep:
	mkdir -p .gpu
	cp -n ../shared/data/cifar10-jpg.tar.gz .gpu/
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux2014_x86_64 -d .gpu diffusers==0.42.1 importlib_metadata

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs
