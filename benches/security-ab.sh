#!/bin/bash
# Identity c64: plaintext without auth (A), plaintext with an auth file and a token (B), TLS without auth (C);
# interleaved rounds on one machine, release binaries of the same commit.
set -u
# Run from a folder holding auth.toml (a principal with the token below), ca.pem, server.pem and
# server.key (a certificate for 127.0.0.1); the release binaries from `cargo build --release`.
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN=${VERALTHEIM_BIN:-$ROOT/target/release/veraltheim}
LOAD=${VERALTHEIM_LOAD:-$ROOT/target/release/veraltheim-load}
cd "${BENCH_DIR:-/tmp/bench}"
rm -rf a b c m; mkdir -p m
$BIN serve --grpc-addr 127.0.0.1:19001 --http-addr 127.0.0.1:19002 --data-dir a --model-repository m --load-model identity > a.log 2>&1 & PA=$!
$BIN serve --grpc-addr 127.0.0.1:19011 --http-addr 127.0.0.1:19012 --data-dir b --model-repository m --load-model identity --auth-file auth.toml --jobs-run-as nobody:nogroup > b.log 2>&1 & PB=$!
$BIN serve --grpc-addr 127.0.0.1:19021 --http-addr 127.0.0.1:19022 --data-dir c --model-repository m --load-model identity --tls-cert server.pem --tls-key server.key > c.log 2>&1 & PC=$!
sleep 3
: > results.jsonl
for round in 1 2 3; do
  for cfg in A B C; do
    case $cfg in
      A) args="--server 127.0.0.1:19001";;
      B) args="--server 127.0.0.1:19011 --token bench-token-123";;
      C) args="--server 127.0.0.1:19021 --ca ca.pem";;
    esac
    out=$($LOAD run $args --model identity --concurrency 64 --duration 8 --warmup 2 --json 2>&1)
    echo "{\"cfg\":\"$cfg\",\"round\":$round,\"report\":$out}" >> results.jsonl
  done
done
kill $PA $PB $PC
echo DONE
