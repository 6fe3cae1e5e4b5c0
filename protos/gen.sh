#!/usr/bin/env bash
# Regenerates the Python code, typed stubs included, next to the .proto files.
# tests/test_generated.py fails when the committed output differs from what this produces.
set -euo pipefail
cd "$(dirname "$0")"
python -m grpc_tools.protoc -I. \
  --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. \
  modelreg/v1/*.proto
