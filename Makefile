# bertstream: `make serve` and `make test` work on a fresh clone with nothing installed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
REPO   ?= model_repository
PORT   ?= 8001
# The model `make serve` builds when the repository has none (random-init until the starter
# model lands; the server says so).
DEFAULT_MODEL ?= news-zh

.PHONY: install serve test lint protos check-protos default-model clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: the CPU build lies on this machine's disk; an unpinned torch is CUDA (GBs).
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[cpu,export,dev]'
	touch $@

install: $(VENV)/.installed

protos: install
	$(PY) -m grpc_tools.protoc -I protos --python_out=protos --pyi_out=protos \
	    --grpc_python_out=protos protos/bertstream/v1/bertstream.proto protos/bertstream/v1/model_config.proto

default-model: install
	@if [ ! -d "$(REPO)/$(DEFAULT_MODEL)" ]; then \
	  echo "Building $(DEFAULT_MODEL) into $(REPO) (random-init BERT-wwm shape: the offline starter model is a later issue)"; \
	  $(VENV)/bin/bertstream-export --source random --model-repository $(REPO) --model $(DEFAULT_MODEL) \
	    --num-layers 3 --hidden-size 768 --num-heads 12 --intermediate-size 3072 \
	    --labels positive,neutral,negative; \
	fi

serve: default-model
	$(VENV)/bin/bertstream-server --model-repository $(REPO) --port $(PORT)

test: install
	$(VENV)/bin/pytest -q

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
