#!/usr/bin/env bash
# Regenerate the gRPC modules of the Open Inference Protocol from src/hybridvit/serving/protos/*.proto,
# in a throwaway environment (grpcio-tools pins its own protobuf; the generated code runs on any newer one).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)
python -m venv "$venv"
"$venv/bin/pip" install -q "grpcio-tools==1.71.0"
"$venv/bin/python" -m grpc_tools.protoc -I src --python_out=src --grpc_python_out=src src/hybridvit/serving/protos/predict_v2.proto
rm -rf "$venv"
