#!/usr/bin/env bash
# Regenerate the committed gRPC/protobuf modules from src/fedcrypt/transport/proto/fedcrypt.proto.
# Needs grpcio-tools 1.75 (gencode for protobuf 6.31, which runs on protobuf 6 and 7):
#   PYTHON=/path/to/venv-with-grpcio-tools-1.75/bin/python scripts/gen_proto.sh
set -euo pipefail
cd "$(dirname "$0")/.."
"${PYTHON:-python}" -m grpc_tools.protoc -I src --python_out=src --pyi_out=src --grpc_python_out=src \
    src/fedcrypt/transport/proto/fedcrypt.proto
