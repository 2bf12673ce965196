# Two commands do all set-up on a fresh machine:
#   make demo   creates .venv, installs, reenacts the bundled photo with the bundled video -> out/demo.mp4
#   make test   creates .venv, installs the dev extras, runs the whole test suite (CPU; Triton interpreted)
# torch is pinned here only for the venv these targets make (setup.py keeps a floor, so your own CUDA
# build is kept when you `pip install ostnet-fast` yourself); override with TORCH_SPEC=...
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PIP = $(VENV)/bin/python -m pip
PYTEST_ARGS ?=

.PHONY: demo test install install-dev gpu clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: setup.py $(VENV)/bin/python
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[video]"
	touch $@

$(VENV)/.installed-dev: setup.py $(VENV)/.installed
	# numpy<2.4: Triton 3.6's CPU interpreter does not run on numpy 2.4 yet.
	$(PIP) install -q -e ".[dev,tensorrt-rtx]" "triton==3.6.0" "numpy<2.4"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(VENV)/bin/ostnet-fast reenact --out out/demo.mp4 $(DEMO_ARGS)

test: $(VENV)/.installed-dev
	TRITON_INTERPRET=1 $(VENV)/bin/python -m pytest -q $(PYTEST_ARGS) tests

# On a machine with a CUDA GPU: GPU tests + all benchmarks, JSON and tables under $$OUT.
gpu:
	bash bench/run_gpu.sh

clean:
	rm -rf $(VENV) out build *.egg-info
