#!/usr/bin/env bash
# mypy --strict over the veilface namespace. The role folders map to
# veilface.* only through setuptools' package-dir, which mypy cannot follow,
# so this builds a throwaway tree of symlinks laid out as the namespace.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
tree="$(mktemp -d)"
trap 'rm -rf "$tree"' EXIT
cp -rs "$repo/veilface" "$tree/veilface"
for role in crypto server client federated; do ln -s "$repo/$role" "$tree/veilface/$role"; done
ln -s "$repo/proto/veilface" "$tree/veilface/proto"
cd "$tree"
python -m mypy --config-file "$repo/pyproject.toml" "${@:-veilface}"
