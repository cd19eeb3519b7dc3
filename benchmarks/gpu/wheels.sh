#!/usr/bin/env bash
# Wheels for the GPU benchmark's workflow row, for a GPU machine without network:
#
#   bash benchmarks/gpu/wheels.sh 3.11     # the Python version of the GPU machine
#
# writes benchmarks/gpu/wheels/ (git-ignored); carry it with the working tree (the device
# tool's `carry: ["benchmarks/gpu/wheels"]`), and run.py installs snakemake from it with
# `pip install --no-index` when the machine has none.  Three passes: resolve here (wheels
# where PyPI has them, source otherwise), build the source-only packages into wheels (pure
# Python ones are portable), then fetch each platform-specific wheel again for the target
# Python version (manylinux x86_64).
set -euo pipefail
py="${1:?give the Python version of the GPU machine, e.g. 3.11}"
here="$(cd "$(dirname "$0")" && pwd)"
dest="$here/wheels"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$dest"
pip download --quiet --prefer-binary -d "$work" "snakemake>=9,<10" "pandas>=2" "pyyaml>=6" "jsonschema>=4" "tqdm>=4.66"
for f in "$work"/*; do
    case "$f" in
        *-none-any.whl) cp "$f" "$dest/" ;;
        *.whl)  # platform wheel: the same version for the target Python
            name="$(basename "$f" | cut -d- -f1)"; version="$(basename "$f" | cut -d- -f2)"
            pip download --quiet --no-deps --only-binary=:all: --implementation cp --python-version "$py" \
                --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
                -d "$dest" "$name==$version" ;;
        *) pip wheel --quiet --no-deps -w "$dest" "$f" ;;  # source only: build it
    esac
done
ls "$dest" | grep -v -- '-none-any.whl' | grep -v "cp${py/./}" | grep -v abi3 && echo "warning: wheels above may not fit Python $py" || true
du -sh "$dest"
