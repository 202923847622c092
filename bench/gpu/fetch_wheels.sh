#!/usr/bin/env bash
# On a CPU machine with PyPI: download the Python 3.12 wheels bench/gpu/run.sh may need on an
# offline GPU host into bench/gpu/wheels (git-ignored; pass it to the device run with carry).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d wheels \
  pytest safetensors numpy tqdm hypothesis "transformers>=4.45" tokenizers huggingface_hub
du -sh wheels
