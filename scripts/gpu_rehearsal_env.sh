#!/usr/bin/env bash
# A stand-in for the GPU machine's Python on this CPU machine, for rehearsing scripts/gpu_acceptance.sh --kit:
# a virtual environment outside the repo with Python 3.12, torch 2.11.0 (the CUDA build, which also runs on the
# CPU) and the other packages the GPU image has (docs/GPU.md; the versions its pip list showed where known).
# Nothing of this project or of its kit goes in: gpu_acceptance.sh installs the kit into a --target folder.
#   bash scripts/gpu_rehearsal_env.sh [VENV]     (default /work/venvs/gpu312; PYTHON=/path/to/python3.12)
# Then: MAE_TRANSFER_PYTHON=VENV/bin/python bash scripts/gpu_acceptance.sh --kit .whl --rehearse
set -euo pipefail
VENV="${1:-/work/venvs/gpu312}"
PYTHON="${PYTHON:-/root/.pyenv/versions/3.12.1/bin/python}"
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' || {
  echo "error: need Python 3.12 (PYTHON=$PYTHON)" >&2; exit 2; }
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
# Versions of the GPU image's pip list (docs/GPU.md) where it gave one; the newest allowed otherwise.
# setuptools: torch 2.11 asks for <82, so it keeps pkg_resources (the kit carries a fallback for an image without).
"$VENV/bin/python" -m pip install -q --disable-pip-version-check \
  torch==2.11.0 torchvision==0.26.0 numpy==2.5.2 transformers==5.17.0 huggingface_hub==1.33.0 \
  tokenizers==0.23.2 safetensors==0.8.0 triton==3.6.0 \
  timm pillow matplotlib scipy tensorboard pytest opencv-python-headless pyyaml tqdm scikit-image \
  setuptools regex tabulate portalocker cloudpickle rich packaging typer click psutil mypy-extensions pathspec
"$VENV/bin/python" -c "import torch, torchvision, numpy; print('[rehearsal env]', '$VENV:', 'torch', torch.__version__, \
'torchvision', torchvision.__version__, 'numpy', numpy.__version__)"
