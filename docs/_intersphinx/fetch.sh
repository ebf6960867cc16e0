#!/usr/bin/env bash
# Download the intersphinx inventories that docs/conf.py reads offline (run from anywhere: `make docs-inventories`).
# Commit the .inv files: the docs build (and CI) never fetches them.
set -euo pipefail
cd "$(dirname "$0")"
declare -A URLS=(
    [stable_baselines3]="https://stable-baselines3.readthedocs.io/en/master/objects.inv"
    [gymnasium]="https://gymnasium.farama.org/objects.inv"
    [torch]="https://docs.pytorch.org/docs/stable/objects.inv"
    [numpy]="https://numpy.org/doc/stable/objects.inv"
    [python]="https://docs.python.org/3/objects.inv"
)
for name in "${!URLS[@]}"; do
    curl -fsSL --max-time 60 -o "$name.inv.part" "${URLS[$name]}"
    mv "$name.inv.part" "$name.inv"
    echo "$name.inv: $(wc -c < "$name.inv") bytes"
done
