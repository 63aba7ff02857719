# vitalgate developer entry points. `make test` is what CI runs (.ci/run).
PYTHON ?= .venv/bin/python
PYTEST_ARGS ?=
BENCH_STAMP := .venv/.vitalgate-bench.stamp

.PHONY: all setup test demo bench bench-peer profile lint clean distclean

all: test

# System packages, TimescaleDB and the venv with the dev extra; fast when done.
setup:
	bash scripts/setup.sh

# The whole suite, integration tests included (they start their own PostgreSQL and mosquitto).
test: setup
	$(PYTHON) -m pytest $(PYTEST_ARGS)

# KEEP=1: serve the central-station page and run until Ctrl-C (prints its URL and a key).
demo: setup
	$(PYTHON) -m bench.demo $(if $(KEEP),--keep)

bench: setup $(BENCH_STAMP)
	$(PYTHON) -m bench.run

# Where the gateway's CPU goes: the ICU and stress workloads under py-spy (bench/profile.py).
profile: setup $(BENCH_STAMP)
	$(PYTHON) -m bench.profile

# The peer comparison (Node-RED 4 + pg, installed with npm into the ignored bench/.peer/).
bench-peer: setup $(BENCH_STAMP)
	@command -v node >/dev/null && command -v npm >/dev/null || { echo "bench-peer needs node (20) and npm" >&2; exit 1; }
	@if [ ! -f bench/.peer/node_modules/node-red/red.js ] || [ ! -d bench/.peer/node_modules/pg ]; then \
		echo "==> npm install node-red@4 pg@8 into bench/.peer"; \
		mkdir -p bench/.peer && cd bench/.peer && npm install --no-audit --no-fund --loglevel=error node-red@4 pg@8; \
	fi
	$(PYTHON) -m bench.peer

# The bench extra, reinstalled when pyproject.toml changes.
# Quiet on success (setuptools' build warnings are noise); the whole log on failure.
$(BENCH_STAMP): pyproject.toml | setup
	@echo "==> venv: pip install -e '.[dev,bench]' (log: .venv/pip-install-bench.log)"
	@$(PYTHON) -m pip install -q --disable-pip-version-check -e '.[dev,bench]' >.venv/pip-install-bench.log 2>&1 \
		|| { cat .venv/pip-install-bench.log >&2; exit 1; }
	@touch $@

lint:
	@if $(PYTHON) -m ruff --version >/dev/null 2>&1; then \
		$(PYTHON) -m ruff check gateway tests bench; \
	elif command -v ruff >/dev/null 2>&1; then \
		ruff check gateway tests bench; \
	else \
		echo "ruff is not installed; skipping lint"; \
	fi

clean:
	find . -path ./.venv -prune -o -type d \( -name __pycache__ -o -name .pytest_cache -o -name .hypothesis \) -print0 \
		| xargs -0 rm -rf
	rm -rf build dist *.egg-info .demo

distclean: clean
	rm -rf .venv
