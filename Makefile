# Everything installs itself: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev

.PHONY: install browser demo test bench soak reliability lint clean client-check gpu-check

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned (a CPU build): an open range would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)
	@echo "trainwatch is installed in $(VENV): 'source $(BIN)/activate' puts it on your PATH"

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/gait_diffusion/demo.py

# The report's browser test renders it in headless Chromium (Debian's package); it may only
# skip where Chromium cannot be had, so `make test` installs it and requires it.
browser:
	@if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; \
	fi

test: $(STAMP) browser
	TRAINWATCH_REQUIRE_BROWSER=1 $(BIN)/python -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,bench]"
	$(BIN)/python benchmarks/run.py

soak: $(STAMP)
	$(BIN)/python benchmarks/soak.py

reliability: $(STAMP)
	$(BIN)/python benchmarks/reliability.py

lint: $(STAMP)
	$(BIN)/ruff check .

# On a machine with a CUDA GPU (and a CUDA torch in .venv): the client's added time per
# step and its host syncs (0) on a ~46M-parameter model; --device cpu checks the logic.
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py

# The client installed as a user would, beside a torch already there (default: the oldest
# release the `client` extra allows), in a throwaway venv: that torch must stay, the
# `trainwatch` command must be on the venv's PATH, and the client's tests must pass on it.
CLIENT_TORCH ?= 2.4.1
CLIENT_VENV  ?= /tmp/trainwatch-client-check
client-check:
	rm -rf $(CLIENT_VENV)
	$(PYTHON) -m venv $(CLIENT_VENV)
	$(CLIENT_VENV)/bin/python -m pip install -q "torch==$(CLIENT_TORCH)"
	$(CLIENT_VENV)/bin/python -m pip install -q -e '.[client]' pytest pytest-timeout
	$(CLIENT_VENV)/bin/python -c "import sys, torch; v = torch.__version__.split('+')[0]; \
		sys.exit(None if v == '$(CLIENT_TORCH)' else 'torch was replaced: ' + v)"
	$(CLIENT_VENV)/bin/trainwatch --help > /dev/null
	$(CLIENT_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_client_*.py
	rm -rf $(CLIENT_VENV)

clean:
	rm -rf $(VENV) out bench-results.json
