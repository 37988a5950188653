# Two entry points for a fresh machine: `make demo` and `make test` (each installs what it needs).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# What CI and `make` install: requirements/ci.lock pins every package (`make lock` refreshes it).
# `make LOCK= install` installs today's releases within pyproject.toml's ranges instead.
LOCK ?= requirements/ci.lock
# Without the lock: the CPU build of torch, pinned: an unpinned torch pulls a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
# Where the CPU torch wheel lies (pip's find-links); the lock resolves torch from there.
FIND_LINKS ?= $(or $(PIP_FIND_LINKS),/opt/wheels)
UV_PIN ?= uv==0.13.10

.PHONY: install tools demo test plugin clean lock toyworld-artifact

$(STAMP): pyproject.toml $(LOCK)
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade $(if $(LOCK),-c $(LOCK)) pip
	$(BIN)/python -m pip install -q $(if $(LOCK),-c $(LOCK),$(TORCH_PIN)) -e '.[test]'
	touch $(STAMP)

# Re-resolve the lock to today's releases (uv, from PyPI and FIND_LINKS): pyproject.toml's [test]
# extra plus requirements/ci.in (torch's CPU build, pip), for CPython 3.11 on x86_64 Linux.
lock:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(UV_PIN)
	$(BIN)/uv pip compile pyproject.toml requirements/ci.in --extra test --upgrade --find-links $(FIND_LINKS) \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" \
		-o $(LOCK)

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
	$(BIN)/python -m deleaker.toyworld.demo --out demo.png

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
