#!/usr/bin/env bash
# Static security scan of terraform/ with checkov, offline.
#
# checkov pins heavy dependencies that clash with the project's, so it lives in its
# own virtual environment, .venv-checkov at the repository root, created on first use.
# Exits non-zero when any check fails; a check that does not apply is skipped inline
# in the .tf file (#checkov:skip=CKV_...:reason) and counted as skipped here.
set -euo pipefail

CHECKOV_VERSION="3.3.30"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo_root"

venv="$repo_root/.venv-checkov"
checkov="$venv/bin/checkov"

if [[ ! -x "$checkov" ]] || [[ "$("$checkov" --version 2>/dev/null || true)" != "$CHECKOV_VERSION" ]]; then
    echo "Installing checkov $CHECKOV_VERSION into .venv-checkov ..."
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "checkov==$CHECKOV_VERSION"
fi

# Keep checkov off the network: no platform downloads (--skip-download,
# BC_SKIP_MAPPING), no PyPI update check at import time.
export BC_SKIP_MAPPING=TRUE
export CKV_SKIP_PACKAGE_UPDATE_CHECK=TRUE
export CHECKOV_RUN_SCA_PACKAGE_SCAN_V2=FALSE
unset BC_API_KEY PRISMA_API_URL || true

report_dir="$(mktemp -d)"
trap 'rm -rf "$report_dir"' EXIT

status=0
"$checkov" \
    --directory terraform \
    --framework terraform \
    --skip-download \
    --compact \
    --quiet \
    --output cli \
    --output json \
    --output-file-path "console,$report_dir/results.json" \
    || status=$?

report="$report_dir/results.json"
if [[ ! -s "$report" ]]; then
    echo "checkov wrote no JSON report (exit code $status)" >&2
    exit "$(( status == 0 ? 1 : status ))"
fi

if "$venv/bin/python" - "$report" <<'PY'
import json
import sys

with open(sys.argv[1], encoding="utf-8") as handle:
    data = json.load(handle)
reports = data if isinstance(data, list) else [data]
totals = {"passed": 0, "failed": 0, "skipped": 0, "parsing_errors": 0}
for report in reports:
    summary = report.get("summary", {})
    for key in totals:
        totals[key] += int(summary.get(key, 0))
    for check in report.get("results", {}).get("skipped_checks", []):
        reason = (check.get("check_result") or {}).get("suppress_comment", "")
        print(f"  skipped {check['check_id']} on {check['resource']}: {reason}")
print(
    "checkov summary - passed: {passed}, failed: {failed}, skipped: {skipped}, "
    "parsing errors: {parsing_errors}".format(**totals)
)
sys.exit(1 if totals["failed"] or totals["parsing_errors"] else 0)
PY
then
    summary_status=0
else
    summary_status=$?
fi

if (( status != 0 )); then
    exit "$status"
fi
exit "$summary_status"
