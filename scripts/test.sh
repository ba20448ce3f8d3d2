#!/usr/bin/env bash
# Command 2: set up .venv (as demo.sh does) and run the test suite.
#   scripts/test.sh                 everything (what CI runs)
#   scripts/test.sh -m "not slow"   skip the end-to-end tests (torchrun, kill/resume)
source "$(dirname "$0")/setup_env.sh"
python -m pytest -q "$@"
