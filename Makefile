# psqa_pipelines — one-command workflows. Everything runs from a local virtualenv (.venv).
#   make demo   fresh machine -> venv, sample data, whole asset graph materialised, where to look
#   make test   fresh machine -> venv, whole test suite
#   make lint   ruff check + ruff format --check (read-only; CI runs it before the tests)
#   make format ruff check --fix + ruff format (rewrites files)
#   make dev    Dagster UI (127.0.0.1:3000) + MLflow UI (127.0.0.1:5000)
#   make team-up / team-down   PostgreSQL + MLflow tracking server under PSQA_HOME/team (PSQA_PROFILE=team)
# Rules and width: [tool.ruff] in pyproject.toml. Dev tools (pytest, ruff, ...) are the `dev` extra.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PSQA_HOME ?= $(CURDIR)/.psqa
export DAGSTER_HOME ?= $(PSQA_HOME)/dagster
PYTEST_ARGS ?=
# xdist workers: the CI machine has 2 cores
PYTEST_WORKERS ?= 2

.PHONY: install demo test lint format dev team-up team-down bench constraints clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and bounded: the CPU wheel (an unbounded torch pulls a multi-GB CUDA build)
	$(PY) -m pip install -q -c constraints.txt "torch==2.13.0"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PY) -m pip check
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m psqa_pipelines.cli demo

test: install
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --durations=15 $(PYTEST_ARGS) psqa_pipelines_tests

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

dev: install
	$(PY) -m psqa_pipelines.cli dev

# one-machine rehearsal of the team deployment: PostgreSQL + MLflow tracking server under PSQA_HOME/team
team-up: install
	PSQA_PROFILE=team $(PY) -m psqa_pipelines.cli team up

team-down:
	PSQA_PROFILE=team $(PY) -m psqa_pipelines.cli team down

bench: install
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/gamma.py
	$(PY) benchmarks/shapley.py
	$(PY) benchmarks/contour_dose_cache.py
	$(PY) benchmarks/contour_dose_train.py --cpu-bf16

constraints:
	rm -rf /tmp/psqa-constraints-venv && $(PYTHON) -m venv /tmp/psqa-constraints-venv
	/tmp/psqa-constraints-venv/bin/pip install -q "torch==2.13.0" && /tmp/psqa-constraints-venv/bin/pip install -q -e ".[dev]"
	(echo "# Exact pins (pip freeze of a fresh venv); install with -c constraints.txt"; \
	 /tmp/psqa-constraints-venv/bin/pip freeze --exclude-editable | sed 's/+cpu//') > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache
