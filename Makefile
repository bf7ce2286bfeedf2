# Two commands on a fresh machine: `make demo` (set up, then search + evaluate on the embedded
# defaults) and `make test`. Both build .venv first when it is missing or stale.
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

.PHONY: setup demo test notebooks hypernet gate
setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/lorahub-plus demo

test: setup
	$(PY) -m pytest -q --runslow $(PYTEST_ARGS)

notebooks: setup
	$(PY) scripts/notebooks.py --write

# Rebuild the shipped hypernetwork (resumable: rerun the same command after an interruption): SFT that
# starts from the library's multitask LoRA (a zero head gives it).
hypernet: setup
	$(VENV)/bin/lorahub-plus hypernet train --work hypernet-run --objective sft --anchor multitask --sft-steps 300

# Rebuild the shipped gate (the learned router) over every expert of library/.
gate: setup
	$(VENV)/bin/lorahub-plus gate train
