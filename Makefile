# Taskgate: `make run` serves everything in one process; `make test` runs the whole suite.
SHELL := /bin/bash
PY := .venv/bin/python
UV := $(or $(shell command -v uv 2>/dev/null),.tools/bin/uv)

.PHONY: install run test lint fmt bench start stop clean

install: .venv/.installed

.tools/bin/uv:
	python3 -m venv .tools
	.tools/bin/pip install --quiet --disable-pip-version-check uv

.venv/.installed: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --all-groups
	@touch $@

run: install
	$(PY) -m app serve --migrate

test: install
	$(PY) -m pytest

lint: install
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy --strict app
	.venv/bin/mypy --strict sdk/python/taskgate
	.venv/bin/bandit -q -c pyproject.toml -r app

fmt: install
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .

bench: install
	@command -v wrk >/dev/null || apt-get install -y wrk >/dev/null 2>&1 || (apt-get update >/dev/null && apt-get install -y wrk >/dev/null) || echo "bench: install wrk for the HTTP enqueue numbers"
	$(PY) -m bench

start:
	docker compose up -d --build

stop:
	docker compose down

clean:
	rm -rf .venv .tools var
