PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements/lock.txt
# pip-tools, pinned: `make lock` must give the same file from the same ranges on any day.
PIP_TOOLS := pip-tools==7.7.0

.PHONY: install test demo lint bench lock check-newest check-floor clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Exact versions of every package (transitive ones too) from the committed lock, then vheads itself with no
# dependency resolution of its own: a fresh clone installs the same set on any day.
$(STAMP): $(BIN)/python pyproject.toml $(LOCK)
	$(BIN)/python -m pip install -q $$(grep -E '^pip==' $(LOCK))
	$(BIN)/python -m pip install -q -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/vheads demo

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/capture.py
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/prune.py

# Re-resolve pyproject's ranges (with the test extras) plus requirements/pins.in to the newest releases they
# allow, and write the lock. Local labels (torch's +cpu) are dropped so a GPU machine's wheel satisfies it.
lock:
	rm -rf .venv-lock
	$(PY) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q $$(grep -E '^pip==' requirements/pins.in) $(PIP_TOOLS)
	.venv-lock/bin/pip-compile --quiet --upgrade --extra test --strip-extras --allow-unsafe --no-emit-index-url \
	  --no-emit-find-links --output-file $(LOCK) pyproject.toml requirements/pins.in
	sed -i -E 's/^([A-Za-z0-9_.-]+==[^+ ]+)\+[A-Za-z0-9.]+/\1/; s|--output-file=[^ ]*|--output-file=$(LOCK)|' $(LOCK)
	rm -rf .venv-lock

# The parity tests and a short demo on the newest releases pyproject's ranges allow, and on transformers' floor.
check-newest:
	bash .ci/upstream newest

check-floor:
	bash .ci/upstream floor

clean:
	rm -rf $(VENV) .venv-newest .venv-floor .venv-lock build *.egg-info
