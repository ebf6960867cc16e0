#!/usr/bin/env bash
# Build a project's intersphinx inventory from its own documentation sources, for machines that cannot reach the
# project's site (fetch.sh downloads the published one instead). The inventory holds the same page names and anchors
# as the published site as long as the sources are those of the published version; commit the .inv file.
#
#   docs/_intersphinx/build_from_source.sh stable_baselines3 <checkout of DLR-RM/stable-baselines3>
#
# stable_baselines3.inv was built this way from DLR-RM/stable-baselines3 at commit
# e05d2dbe6eda0acd0ef2e316e3e4065677add3eb (its docs/ directory, with the SB3 installed in .venv for autodoc).
set -euo pipefail
name="$1"
source_dir="$(cd "$2" && pwd)"
here="$(cd "$(dirname "$0")" && pwd)"
sphinx="${SPHINX_BUILD:-$here/../../.venv/bin/sphinx-build}"
out="$(mktemp -d)"
"$sphinx" -q -b html "$source_dir/docs" "$out"
cp "$out/objects.inv" "$here/$name.inv"
echo "$name.inv: $(wc -c < "$here/$name.inv") bytes"
