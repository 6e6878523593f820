# Taskgate: `make run` serves everything in one process; `make test` runs the whole suite;
# `make faults` runs the fault suite (tests/faults: real processes under faults, then schemathesis).
SHELL := /bin/bash
PY := .venv/bin/python
UV := $(or $(shell command -v uv 2>/dev/null),.tools/bin/uv)

.PHONY: install run test test-browser browser-deps faults test-pgbouncer test-patroni patroni-test patroni-deps lint fmt bench start stop clean

# Bytecode compiled ahead: where PYTHONDONTWRITEBYTECODE is set (as on CI machines) Python never
# writes its .pyc files, and every process compiled every module it imported at each start: 3.5 s
# of a server's 5 s start, paid by each process the tests, the fault suite and `make run` start.
# The environment's packages are compiled when it is installed, the project's own code (cheap when
# up to date) before each command that starts processes.
install: .venv/.installed
	@$(PY) -m compileall -q -j 0 app sdk/python tests bench >/dev/null

.tools/bin/uv:
	python3 -m venv .tools
	.tools/bin/pip install --quiet --disable-pip-version-check uv

.venv/.installed: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --all-groups --all-extras --compile-bytecode
	@touch $@

run: install
	$(PY) -m app serve --migrate

# three pytest-xdist workers on two cores, each with a database of its own: most tests wait on
# processes and timers (3:40 against 4:46 with two)
TEST_WORKERS ?= 3
test: install
	$(PY) -m pytest -n $(TEST_WORKERS)

# Debian's chromium for the console's browser tests (Playwright drives it; its own download cannot work here)
CHROMIUM ?= /usr/bin/chromium
browser-deps:
	@test -x $(CHROMIUM) || apt-get install -y chromium >/dev/null 2>&1 || (apt-get update >/dev/null && apt-get install -y chromium >/dev/null)
	@test -x $(CHROMIUM) || (echo "browser-deps: no chromium at $(CHROMIUM)" >&2; exit 1)

# the console in headless Chromium against the real HTTPS server; writes docs/console-*.png
test-browser: install browser-deps
	TASKGATE_BROWSER_TESTS=1 CHROMIUM=$(CHROMIUM) $(PY) -m pytest tests/browser

# every scenario has its own hard timeout; the whole run takes ~3-4 minutes on 2 cores and prints
# a table of figures (also written to tests/faults/results/latest.json)
faults: install
	$(PY) -m pytest -m faults tests/faults

# the engine's core cases behind Debian's PgBouncer (transaction mode with and without LISTEN,
# session mode); installs pgbouncer with apt when missing; ~2 minutes
test-pgbouncer: install
	@command -v pgbouncer >/dev/null || test -x /usr/sbin/pgbouncer || apt-get install -y pgbouncer >/dev/null 2>&1 || (apt-get update >/dev/null && apt-get install -y pgbouncer >/dev/null) || echo "test-pgbouncer: pgbouncer could not be installed; the suite skips"
	$(PY) -m pytest -m pgbouncer tests/pgbouncer

# three PostgreSQL 15 nodes under Debian's patroni with one etcd (v2 API), synchronous_mode on; a
# switchover and a kill -9 of the primary under enqueue load; ~1.5 minutes; figures in
# tests/patroni/results/latest.json
patroni-deps:
	@(command -v patroni >/dev/null && command -v etcd >/dev/null) || apt-get install -y patroni etcd-server >/dev/null 2>&1 || (apt-get update >/dev/null && apt-get install -y patroni etcd-server >/dev/null) || echo "patroni-deps: patroni/etcd-server could not be installed; the suite skips"

test-patroni: install patroni-deps
	$(PY) -m pytest -s -m patroni tests/patroni

patroni-test: test-patroni

lint: install
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy --strict app
	.venv/bin/mypy --strict sdk/python/taskgate
	.venv/bin/bandit -q -c pyproject.toml -r app
	.venv/bin/lint-imports

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
