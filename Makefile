# blis-model developer tasks. A fresh machine needs only python3 (with venv + pip) and make.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp

# Environment for tests and the demo: single-threaded BLAS, local Ray without auth,
# and no AWS instance-metadata lookups. Exported to every recipe as well.
TEST_ENV := OPENBLAS_NUM_THREADS=1 RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \
	AWS_EC2_METADATA_DISABLED=true
$(foreach assignment,$(TEST_ENV),$(eval export $(assignment)))

.PHONY: setup test demo lint clean

setup: $(STAMP)

# (Re)installs only when the venv is missing or pyproject.toml is newer than the stamp.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

test: setup go-toolchain stack-deps
	$(TEST_ENV) $(BIN)/python -m pytest -q tests

# The real step-only sample corpus (BLIS default alphas); a synthetic multi-config corpus
# with journey + API traces (fitted alphas, TTFT/ITL/E2E accuracy); then the client view of
# synthetic runs with a physical step law (request measurements only): fit by replay, and
# that release replayed on them (one row per request in out/demo-requests.csv). All into
# store/.
demo: setup
	$(TEST_ENV) $(BIN)/blis-model calibrate corpus/h100-real-steps --store store/
	rm -rf out/demo-synth out/demo-requests
	$(TEST_ENV) $(BIN)/blis-model synth out/demo-synth --experiments 3 --requests 200 --seed 0
	$(TEST_ENV) $(BIN)/blis-model calibrate out/demo-synth --store store/
	$(TEST_ENV) $(BIN)/blis-model synth out/demo-requests --experiments 3 --requests 300 \
		--seed 1 --client-only --step-law physics
	release=$$($(TEST_ENV) $(BIN)/blis-model calibrate out/demo-requests --store store/ | tail -n 1) \
		&& $(TEST_ENV) $(BIN)/blis-model replay "$$release" out/demo-requests \
			--out out/demo-requests.csv

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# The calibration loop on this machine (127.0.0.1): S3 server, Prefect server + UI (on
# PostgreSQL), Ray head and the served deployments; `make stop` stops exactly what
# `make serve` started (letting runs in flight finish first).
.PHONY: serve stop
serve: setup stack-deps
	$(BIN)/python -m deploy.stack start

stop:
	$(BIN)/python -m deploy.stack stop

# Go (Debian's golang-go, 1.19) for the Go evaluator of releases (deploy/goeval); its
# golden tests run inside pytest (tests/test_golden.py). Installs only when missing, as root.
.PHONY: go-toolchain
go-toolchain:
	@command -v go >/dev/null 2>&1 || { if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go; \
	else echo "go is missing: apt-get install golang-go (Go evaluator tests will skip)"; fi; }

# The fast subset: every test that needs no service (no S3 server, Prefect or Ray; a test
# using one is marked `services` by tests/conftest.py), in a few minutes.
.PHONY: test-fast
test-fast: setup
	$(TEST_ENV) $(BIN)/python -m pytest -q -m "not services" tests

# Debian's PostgreSQL (the local stack's Prefect database: concurrent runs never hit SQLite's
# "database is locked") and Chromium (the browser test of the Prefect UI, driven by
# Playwright: never `playwright install`). Installed only when missing, as root.
.PHONY: stack-deps
stack-deps:
	@missing=""; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 \
		|| missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	else echo "not installed:$$missing (apt-get install$$missing as root): the stack uses" \
		"SQLite without postgresql; the browser test skips without chromium"; fi; fi
