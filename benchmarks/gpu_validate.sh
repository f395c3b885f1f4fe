#!/usr/bin/env bash
# GPU validation in one command (see benchmarks/gpu_validate.py): install the wheels fetched into .whl/ by
# benchmarks/fetch_gpu_wheels.sh (no internet needed), then run; arguments go to the script.
cd "$(dirname "$0")/.." && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && PYTHONUNBUFFERED=1 exec python3 benchmarks/gpu_validate.py "$@"
