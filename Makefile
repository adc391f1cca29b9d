# The README's two commands: `make demo` and `make test` do all set-up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements/apt.txt 2>/dev/null | sha256sum | cut -c1-12)

.PHONY: setup demo test lint typecheck check bench docs check-arm64 clean

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

# The documentation site, into build/site (strict: a broken link or anchor fails).
docs: $(STAMP)
	$(BIN)/mkdocs build --strict

# The agent's tests in an emulated Debian arm64 root (needs root; not part of `make test`: the first run builds the
# root, about 10-17 minutes on 2 cores). See docs/arm64.md.
check-arm64: $(STAMP)
	./scripts/check_arm64.sh "$(abspath $(BIN))/python"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
