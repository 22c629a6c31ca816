# One-command set-up: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
# sae-lens and saev, for tests/test_interop.py only, in a venv of their own layered over .venv (a
# .pth file): sae-lens pulls transformers and wandb, which timm and open_clip import whenever
# they are installed, and every visae process would pay for them.
INTEROP := .venv-interop
INTEROP_STAMP := $(INTEROP)/.setup-done
FMNIST_DEB := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup demo test bench data clean

setup: $(STAMP) $(INTEROP_STAMP) data

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "visae needs Python >= 3.11 (set PYTHON=python3.11)")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

$(INTEROP_STAMP): $(STAMP)
	test -x $(INTEROP)/bin/python || $(BIN)/python -m venv --without-pip $(INTEROP)
	$(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
	  > "$$($(INTEROP)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/visae-venv.pth"
	$(BIN)/python -m pip --python $(INTEROP)/bin/python install -q -c constraints.txt sae-lens
	$(BIN)/python -m pip --python $(INTEROP)/bin/python install -q --no-deps -c constraints.txt saev
	touch $(INTEROP_STAMP)

# Demo data: Debian's dataset-fashion-mnist when we can install it, otherwise the
# official download with checksum verification (`visae fetch fashion-mnist`).
data: $(STAMP)
	@if [ ! -f $(FMNIST_DEB) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null 2>&1 || true; \
	fi
	$(BIN)/visae fetch fashion-mnist --out resources/fashion-mnist

demo: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --cores all

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/visae bench extract
	$(BIN)/visae bench loader
	$(BIN)/visae bench train
	$(BIN)/visae bench compare
	$(BIN)/visae bench intervene

clean:
	rm -rf results/* .snakemake
