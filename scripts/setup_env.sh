# Sourced by demo.sh and test.sh: create .venv if missing and install deepspec into it.
# torch is pinned and installed first: asking for plain `torch` later would otherwise pull the
# newest CUDA build (several GB) on machines where only the CPU wheel is wanted.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SETUP_START=$SECONDS
if [ ! -x .venv/bin/python ]; then
  echo "set-up: creating .venv and installing torch 2.13.0 and deepspec's dependencies (a few minutes the first time)"
  python3 -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev]"
echo "set-up: .venv ready in $(( SECONDS - SETUP_START )) s"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
