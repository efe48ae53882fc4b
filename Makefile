# The two commands a newcomer needs: `make demo` and `make test`. Both bootstrap themselves.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bootstrapped

.PHONY: all test test-slow demo lint typecheck unit bench soak bootstrap clean

all: test

$(STAMP): pyproject.toml scripts/bootstrap.sh
	@./scripts/bootstrap.sh $(VENV)
	@touch $(STAMP)

bootstrap: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# Two workers (pytest-xdist), each taking whole modules so that a module's shared world is set up once.
PARALLEL ?= -n 2 --dist loadscope

test: lint typecheck
	rm -rf .coverage
	$(VENV)/bin/pytest $(PARALLEL) --cov --cov-report=term --cov-report=html:.coverage/html

# The same suite with the large budgets (fuzzing): before a release, not on every change.
test-slow: lint typecheck
	$(VENV)/bin/pytest $(PARALLEL) --run-slow

unit: $(STAMP)
	$(VENV)/bin/pytest tests/unit -q

demo: $(STAMP)
	$(PY) scripts/demo.py

bench: $(STAMP)
	$(PY) bench/run.py

soak: $(STAMP)
	$(PY) -m bench.soak --seconds $${SOAK_SECONDS:-60}

clean:
	rm -rf $(VENV) .demo .bench .mypy_cache .ruff_cache .pytest_cache
