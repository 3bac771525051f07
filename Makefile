# anomap: `make demo` (train + evaluate + report on the built-in demo data) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= ../shared/data
BENCH_DATA ?= $(DATA)/mpdd_metal_plate $(DATA)/magnetic_tile
BENCH_METHODS ?= gtrans_memory

.PHONY: demo test lint bench install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>/dev/null || true

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[test,teachers]"
	$(BIN)/python -c "import anomap, torch; print('anomap', anomap.__version__, 'torch', torch.__version__)"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/anomap demo --out runs/demo

test: install
	$(BIN)/python -m pytest tests

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

bench: install
	$(BIN)/anomap bench --data $(BENCH_DATA) --method $(BENCH_METHODS) --out runs/bench/benchmarks.md

clean:
	rm -rf runs build *.egg-info src/*.egg-info .pytest_cache
