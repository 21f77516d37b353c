#!/bin/bash
# KServe over gRPC against KServe over HTTP/REST (JSON tensors, and the binary-data extension) on
# one server, in interleaved rounds: identity 1x16 at concurrency 64 and 1; then all-MiniLM-L6-v2
# (`veraltheim-load text`, one sentence per request) once per protocol. A second server with
# --otlp-endpoint (a port where no collector listens: every span is built, then dropped by the
# exporter) is loaded over gRPC in the same rounds, for the cost of tracing.
# Needs release binaries (cargo build --release -p veraltheim -p veraltheim-benches) and, for the
# MiniLM part, the provisioned model (./scripts/test provisions .venv and .cache/models).
set -u
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN=${VERALTHEIM_BIN:-$ROOT/target/release/veraltheim}
LOAD=${VERALTHEIM_LOAD:-$ROOT/target/release/veraltheim-load}
OUT=${BENCH_DIR:-/tmp/bench-protocols}
ROUNDS=${ROUNDS:-3}
mkdir -p "$OUT" && cd "$OUT" || exit 1
rm -rf data models; mkdir -p models
"$BIN" serve --grpc-addr 127.0.0.1:19101 --http-addr 127.0.0.1:19102 --data-dir data \
  --model-repository models --load-model identity --log-level warn > server.log 2>&1 & PID=$!
rm -rf data-otel
"$BIN" serve --grpc-addr 127.0.0.1:19111 --http-addr 127.0.0.1:19112 --data-dir data-otel \
  --model-repository models --load-model identity --log-level error \
  --otlp-endpoint http://127.0.0.1:19119 > server-otel.log 2>&1 & PID_OTEL=$!
sleep 3
: > identity.jsonl
for round in $(seq "$ROUNDS"); do
  for c in 64 1; do
    for p in grpc http http-binary grpc-otel; do
      case $p in grpc) addr=127.0.0.1:19101;; grpc-otel) addr=127.0.0.1:19111;; *) addr=127.0.0.1:19102;; esac
      out=$("$LOAD" run --server $addr --protocol ${p%-otel} --model identity --concurrency $c \
        --duration 6 --warmup 1 --json 2>&1)
      echo "{\"protocol\":\"$p\",\"concurrency\":$c,\"round\":$round,\"report\":$out}" >> identity.jsonl
    done
  done
done
kill $PID $PID_OTEL; wait $PID $PID_OTEL 2>/dev/null
if [[ "${TEXT:-1}" == 1 ]]; then
  export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$(ls "$ROOT"/.venv/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.* | head -1)}
  : > text.jsonl
  for p in grpc http http-binary; do
    "$LOAD" text --model-dir "$ROOT/.cache/models/all-MiniLM-L6-v2" \
      --onnx "$ROOT/.cache/models/all-MiniLM-L6-v2.onnx" --veraltheim-bin "$BIN" \
      --sentences-file "$ROOT/testdata/minilm-reference.json" --protocol $p \
      --batch-sizes 64 --compute-duration 3 --duration 8 --warmup 2 --json >> text.jsonl
  done
fi
echo DONE
