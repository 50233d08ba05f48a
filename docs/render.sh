#!/usr/bin/env bash
# Render the architecture diagram: docs/architecture.dot -> docs/architecture.png.
# Needs graphviz (`apt-get install graphviz`). Usage: docs/render.sh [--check]
#   --check  fail when the committed PNG is older than its source (for CI).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="$here/architecture.dot"
out="$here/architecture.png"
if [[ "${1:-}" == "--check" ]]; then
  if [[ ! -f "$out" ]]; then echo "docs/architecture.png is missing: run docs/render.sh" >&2; exit 1; fi
  if [[ "$(git -C "$here" log -1 --format=%ct -- architecture.dot 2>/dev/null || echo 0)" -gt \
        "$(git -C "$here" log -1 --format=%ct -- architecture.png 2>/dev/null || echo 0)" ]]; then
    echo "docs/architecture.png is older than architecture.dot: run docs/render.sh" >&2; exit 1
  fi
  exit 0
fi
if ! command -v dot >/dev/null 2>&1; then
  echo "graphviz 'dot' is missing: apt-get install graphviz" >&2
  exit 1
fi
dot -Tpng -Gdpi=110 "$src" -o "$out.tmp"
mv "$out.tmp" "$out"
echo "wrote $out"
