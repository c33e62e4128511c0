# The two contract commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# On CPU machines this pin installs the local CPU build; GPU users install their own torch first
# (the package itself only asks for torch>=2.6).
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv test demo bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

test: venv
	$(BIN)/python -m pytest -q -x --durations=15 tests

demo: venv
	$(BIN)/pipefusion-compile plan PixArtTransformer2DModel --stages 2 --patches 4
	$(BIN)/python examples/simulate_pixart.py --stages 2 --patches 4 --steps 10

bench: venv
	$(BIN)/python benchmarks/bench_single_process.py --out benchmarks/results/single_process.md
	$(BIN)/python benchmarks/bench_multiprocess.py

clean:
	rm -rf $(VENV) *.egg-info
