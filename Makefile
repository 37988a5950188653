# Two entry points for a fresh machine: `make demo` and `make test` (each installs what it needs).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU build of torch, pinned: an unpinned torch pulls a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: install browser demo test plugin clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Headless Chromium for the HTML report test (Debian's package); the test skips with a reason without it.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get -qq update && DEBIAN_FRONTEND=noninteractive apt-get -qq install -y chromium >/dev/null; \
		else echo "make: no chromium and no root apt-get: the browser test will skip"; fi; }

# The embedded default model (the toy world): one prompt, seeds 0-7, vanilla above DeLeaker,
# every cell tagged by the exact judge (leak / clean / missing); the counts are printed.
demo: $(STAMP)
	$(BIN)/python -m deleaker.benchmarks.toyworld.demo --out demo.png

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -ra tests

plugin:
	cmake -S . -B build && cmake --build build -j

clean:
	rm -rf build demo.png
