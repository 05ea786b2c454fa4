#!/usr/bin/env bash
# Fetches the tokenizer library into OUT_DIR/lib without installing anything: onnxruntime-extensions' tokenizer (the
# `ortx` code that reads a Hugging Face tokenizer.json) as the onnxruntime-genai-core wheel ships it, a plain C
# library (libonnxruntime-genai.so, the Oga C API) that no Python is needed to load. (onnxruntime-extensions' own
# wheel exports the same tokenizer as the Ortx C API, but from a Python extension module that cannot be loaded
# outside Python: it needs libpython's symbols; and it has no sdist with the headers.) The wheel is downloaded with
# pip (PYTHON: the project venv's), checked against a pinned sha256 and the library unzipped; l2c-run dlopens it.
set -euo pipefail
out=${1:?usage: fetch-tokenizer-library.sh OUT_DIR [PYTHON]}
python=${2:-python3}
version=0.18.0
wheel=onnxruntime_genai_core-$version-py3-none-manylinux_2_28_x86_64.whl
sha256=8a29c0a3e517cdc7cac8809ee49c2b288f549fed6cdd31c08b53df06fd50460c

if [ "$(uname -m)" != x86_64 ]; then
  echo "fetch-tokenizer-library: the pinned $wheel is for x86_64; this machine is $(uname -m)" >&2
  exit 1
fi
mkdir -p "$out/lib"
out=$(cd "$out" && pwd)
if [ ! -f "$out/$wheel" ] || ! echo "$sha256  $out/$wheel" | sha256sum --check --status; then
  download=$(mktemp -d)
  trap 'rm -rf "$download"' EXIT
  "$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary :all: \
    --platform manylinux_2_28_x86_64 "onnxruntime-genai-core==$version" -d "$download"
  if ! echo "$sha256  $download/$wheel" | sha256sum --check --status; then
    echo "fetch-tokenizer-library: $wheel does not have the pinned sha256 $sha256" >&2
    exit 1
  fi
  mv "$download/$wheel" "$out/$wheel"
fi
member=onnxruntime_genai_core/bin/libonnxruntime-genai.so
"$python" -c 'import sys, zipfile; open(sys.argv[3], "wb").write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))' \
  "$out/$wheel" "$member" "$out/lib/libonnxruntime-genai.so.tmp"
mv "$out/lib/libonnxruntime-genai.so.tmp" "$out/lib/libonnxruntime-genai.so"
echo "tokenizer library (onnxruntime-genai-core $version) in $out/lib/libonnxruntime-genai.so"
