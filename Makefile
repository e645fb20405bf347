# Two commands do everything on a fresh machine:
#   make demo   build a local virtual environment (first use only) and run the demo
#   make test   build the same environment and run the test suite
#   make lint   the gates CI runs before the tests (ruff, import-linter's contracts)
#   make test-fast  the engine's quick tests (not marked slow): the developer loop
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.alseg-installed

# nnU-Net on a small CPU machine: no background augmentation workers, one
# preprocessing process, no torch.compile.
export nnUNet_def_n_proc ?= 1
export nnUNet_compile ?= f

.PHONY: demo test test-fast lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	# torch and torchvision resolved together from the registry: a matching
	# pair is needed because segment-anything and nnU-Net import torchvision.
	$(BIN)/python -m pip install --quiet torch torchvision
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/alseg demo

test: $(STAMP)
	$(BIN)/python -m pytest -q Testing/Python

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" Testing/Python

lint: $(STAMP)
	$(BIN)/ruff check ALSegLib ALSeg Testing
	PYTHONPATH=ALSeg $(BIN)/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache
