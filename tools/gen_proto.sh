#!/bin/sh
# Regenerates criu_py/images/pb/*_pb2.py from proto/*.proto. The generated modules are
# committed, so installing criu-py needs no protoc; run this after editing proto/.
# Needs grpcio-tools in the venv (pip install grpcio-tools).
set -e
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out=criu_py/images/pb
mkdir -p "$out"
$PY -m grpc_tools.protoc -Iproto --python_out="$out" proto/*.proto
# protoc emits absolute imports (import core_pb2); make them package-relative.
sed -i -E 's/^import ([a-z0-9_]+_pb2) as /from . import \1 as /' "$out"/*_pb2.py
