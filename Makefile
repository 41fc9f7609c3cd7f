# Every target sets itself up on a fresh machine: the virtual environment is made on first use and filled from the
# lock (requirements.lock: exact versions and hashes), so every machine gets the same packages on any day.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements.lock

.PHONY: setup test test-fast check demo bench lock wheel-check clean

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-deps --require-hashes -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m pip check
	touch $@

setup: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q --doctest-modules lightning_delta tests

# The edit loop (under a minute): every test but those that start processes or take seconds (CONTRIBUTING.md).
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q --doctest-modules -m "not subprocess and not distributed and not slow" lightning_delta tests

# Lint, format and types: ruff over the repository, mypy over the package (their settings are in pyproject.toml).
check: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

demo: $(VENV)/.installed
	$(VENV)/bin/lightning-delta demo

bench: $(VENV)/.installed
	$(PY) -m benchmarks

# Refresh the lock to the newest releases that pyproject.toml's ranges admit (then run `make test`, and commit the
# lock with lightning_delta/cli/_help.py written anew: python -c "import lightning_delta.cli as c; c.write_stored_help()").
lock:
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet "pip-tools==7.7.0"
	.lock-venv/bin/pip-compile --quiet --upgrade --extra test --generate-hashes --strip-extras --allow-unsafe \
		--no-emit-index-url --no-emit-find-links -c requirements/lock-constraints.txt -o $(LOCK) pyproject.toml

# The package as users install it: a wheel built from the repository, installed into a fresh venv beside the locked
# packages, runs the demo's fast grid and finds the shipped configs by name from a directory outside the repository.
wheel-check: $(VENV)/.installed
	bash .ci/wheel_check

clean:
	rm -rf $(VENV) .lock-venv build dist *.egg-info
