# synthbrain: the two commands README gives.
#   make demo   set up everything on a fresh machine, then run the end-to-end demo on simulated sites
#   make test   set up everything on a fresh machine, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.synthbrain-installed
TORCH  ?= torch==2.13.0

.PHONY: setup tools demo test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: the local 2.13 CPU wheel; an open range would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q "$(TORCH)"
	# editable install as a path entry (compat mode), not an import hook: an NVFlare job's custom/ folder holds a
	# copy of fl_app/fl/client.py, and only a regular package on sys.path outranks that partial namespace copy
	$(BIN)/python -m pip install -q -e ".[dev,tune]" --config-settings editable_mode=compat
	touch $(STAMP)

setup: $(STAMP)

# The BIDS validator (npm, pinned in tools/package.json) used by tests and `synthbrain simulate --validate`.
tools/node_modules/.bin/bids-validator: tools/package.json
	npm ci --prefix tools --no-audit --no-fund --loglevel=error
	touch $@

tools: tools/node_modules/.bin/bids-validator

demo: setup
	$(BIN)/synthbrain demo

test: setup tools
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check fl_app tests bench jobs
	$(BIN)/ruff format --check fl_app tests bench jobs

clean:
	rm -rf $(VENV) tools/node_modules runs workspaces .pytest_cache
