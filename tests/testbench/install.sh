#!/usr/bin/env bash
# Google's Cloud Storage emulator, storage-testbench, for the tests in tests/testbench.
#
# It pins grpcio, protobuf and flask versions of its own, so it lives in its own virtual
# environment, .venv-testbench at the repository root, installed from the git archive
# in ../shared/vendor (its dependencies come from the package registry). A clone
# without ../shared/vendor has nothing to install: the tests skip there.
set -euo pipefail

ARCHIVE_NAME="storage-testbench-e8c85072463f.tar.gz"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
archive="$repo_root/../shared/vendor/$ARCHIVE_NAME"
venv="$repo_root/.venv-testbench"
stamp="$venv/.installed-from"

if [[ ! -f "$archive" ]]; then
    echo "no ../shared/vendor/$ARCHIVE_NAME: the storage-testbench tests will skip"
    exit 0
fi
if [[ -x "$venv/bin/gunicorn" ]] && [[ "$(cat "$stamp" 2>/dev/null || true)" == "$ARCHIVE_NAME" ]]; then
    exit 0
fi
echo "Installing storage-testbench ($ARCHIVE_NAME) into .venv-testbench ..."
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$archive"
echo "$ARCHIVE_NAME" > "$stamp"
