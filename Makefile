# The two contract commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# On CPU machines this pin installs the local CPU build; GPU users install their own torch first
# (the package itself only asks for torch>=2.6).
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv venv-examples test test-full demo bench bench-degrees bench-quality train-digits sweep coverage clean

venv: $(VENV)/.installed

# the demo and the digits scripts also need the [examples] extra (scikit-learn, matplotlib, tqdm)
venv-examples: $(VENV)/.installed-examples

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

$(VENV)/.installed-examples: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[test,examples]'
	touch $@

# make test: the suite with a fixed sample of its long parametrized groups (tests/conftest.py SAMPLE_EVERY);
# make test-full: every parameter set of them too. Both run one pytest worker per core (pytest-xdist; each
# worker's torch gets its share of the cores, tests/conftest.py); TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= $(shell nproc 2>/dev/null || echo 2)
test: venv
	$(BIN)/python -m pytest -q -x --durations=15 -n $(TEST_WORKERS) -m "not full" tests

test-full: venv
	$(BIN)/python -m pytest -q -x --durations=25 -n $(TEST_WORKERS) tests

# the trained digits DiT, serially and on 2 ranks (torchrun, gloo, CPU): writes out/demo.png
demo: venv-examples
	OMP_NUM_THREADS=1 $(BIN)/python -m torch.distributed.run --standalone --nproc-per-node 2 examples/digits/demo.py

bench: venv
	$(BIN)/python benchmarks/bench_single_process.py --out benchmarks/results/single_process.md
	$(BIN)/python benchmarks/bench_multiprocess.py
	$(BIN)/python benchmarks/bench_models.py --out benchmarks/results/models.md

# the differential sweep (tests/test_sweep.py): compiled == the eager reference over models x resolution x batch x
# N x M x every cut x warmup. SWEEP=full: the whole product (4,056 configurations, several hours on 2 cores);
# SWEEP=<k>: a seeded sample of k (SWEEP_SEED). Summary in benchmarks/results/sweep.md
SWEEP ?= full
SWEEP_SEED ?= 0
sweep: venv
	PIPEFUSION_SWEEP=$(SWEEP) PIPEFUSION_SWEEP_SEED=$(SWEEP_SEED) PIPEFUSION_SWEEP_REPORT=benchmarks/results/sweep.md \
		$(BIN)/python -m pytest -q tests/test_sweep.py

# every diffusers DiT class (tiny, random weights) through the backend, 2 real ranks (gloo) included:
# benchmarks/results/coverage.md and the README's table (about 40 minutes on 2 cores)
# parallel='auto' on 2 ranks: every candidate measured next to its prediction (about 6 minutes on 2 cores)
bench-degrees: venv
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_degrees.py --out benchmarks/results/degrees.md

coverage: venv
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/coverage.py --ranks --out benchmarks/results/coverage.md --readme README.md

bench-quality: venv-examples
	$(BIN)/python benchmarks/bench_quality.py

# retrains the shipped weights in examples/digits/weights (about 15-20 minutes on 2 CPU cores)
train-digits: venv-examples
	$(BIN)/python examples/digits/train.py

clean:
	rm -rf $(VENV) *.egg-info
