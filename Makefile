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

test: setup
	$(TEST_ENV) $(BIN)/python -m pytest -q tests

demo: setup
	$(TEST_ENV) $(BIN)/blis-model calibrate corpus/h100-real-steps --store store/

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
