# The README's two commands: `make demo` and `make test` do all set-up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements/apt.txt 2>/dev/null | sha256sum | cut -c1-12)

.PHONY: setup demo test lint typecheck check bench clean

$(STAMP): pyproject.toml
	./scripts/setup.sh "$(PY)" "$(VENV)"
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m simulators.demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy bundles device_agent converter fleet_server simulators
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy bundles device_agent converter fleet_server simulators

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
