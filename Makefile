# One entry point for developers and CI: `make test` is exactly what CI runs.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
# The CPU build of torch; production images may install any torch >= 2.4 (CUDA builds included).
TORCH_PIN ?= torch==2.13.0
DEMO_DIR ?= demo-run
DEMO_STEPS ?= 300
DEMO_PORT ?= 8000

.PHONY: install lint types contracts pytest test quick pytest-quick wheel-smoke demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types: install
	$(BIN)/mypy

contracts: install
	$(BIN)/lint-imports

pytest: install
	$(BIN)/pytest

test: lint types contracts pytest

# The loop a developer runs between edits: everything but the browser, the slow tests and the
# tests that train a model (tests/conftest.py marks those); `make test` stays the full suite.
QUICK_MARKERS := not browser and not slow and not trains

pytest-quick: install
	$(BIN)/pytest -q -m "$(QUICK_MARKERS)"

quick: lint types contracts pytest-quick

# The wheel as users get it: built, installed in a fresh venv, used from another folder.
wheel-smoke:
	TORCH_PIN="$(TORCH_PIN)" python3 scripts/wheel_smoke.py

# Trains a small real model in the background and watches it live at http://127.0.0.1:$(DEMO_PORT)/
demo: install
	rm -rf $(DEMO_DIR) && mkdir -p $(DEMO_DIR)
	$(PY) -m alphawatch.workers.demo_run $(DEMO_DIR) --steps $(DEMO_STEPS) --save-every 20 --sleep 1 \
		> $(DEMO_DIR).train.log 2>&1 & \
	trap 'kill $$! 2>/dev/null' EXIT INT TERM; \
	$(BIN)/alphawatch up $(DEMO_DIR) --port $(DEMO_PORT)

bench: install
	$(PY) bench/bench_spectral.py
	$(PY) bench/bench_reader.py
	$(PY) bench/bench_api.py
	$(PY) bench/bench_e2e.py
	$(PY) bench/bench_budget.py
	$(PY) bench/bench_compare.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache $(DEMO_DIR) alphawatch.db
