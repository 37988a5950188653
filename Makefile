# Two entry points for a fresh machine: `make demo` and `make test` (each installs what it needs).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU build of torch, pinned: an unpinned torch pulls a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: install tools demo test plugin clean toyworld-artifact

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Debian's headless Chromium (the HTML report and playground tests) and hey (the load generator
# tests); a test whose tool is missing skips with a reason.
tools:
	@missing=""; for t in chromium hey; do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get -qq update && DEBIAN_FRONTEND=noninteractive apt-get -qq install -y $$missing >/dev/null; \
		else echo "make: no$$missing and no root apt-get: their tests will skip"; fi; fi

# The embedded default model (the toy world): one prompt, seeds 0-7, vanilla above DeLeaker,
# every cell tagged by the exact judge (leak / clean / missing); the counts are printed.
demo: $(STAMP)
	$(BIN)/python -m deleaker.benchmarks.toyworld.demo --out demo.png

# The embedded model's shipped artifact (runtime/models/toyworld-onnx), exported again from its
# diffusers folder (runtime/models/toyworld) with the options in export/embedded.py.
toyworld-artifact: $(STAMP)
	$(BIN)/python -m deleaker.export.embedded

test: $(STAMP) tools
	$(BIN)/python -m pytest -q -ra tests

plugin:
	cmake -S . -B build && cmake --build build -j

clean:
	rm -rf build demo.png
