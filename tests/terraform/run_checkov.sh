#!/usr/bin/env bash
# Static security scan of terraform/ with checkov, offline.
#
# checkov pins heavy dependencies that clash with the project's, so it lives in its
# own virtual environment, .venv-checkov at the repository root, made on first use
# (the only step that needs the package registry). Exits non-zero when any check
# fails or a file does not parse. A check that does not apply is skipped inline in
# the .tf file (#checkov:skip=CKV_...:reason); skips are listed with their reasons.
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

# Keep checkov off the network: no platform downloads (--skip-download and
# BC_SKIP_MAPPING) and no PyPI version check, which runs when checkov is imported.
export BC_SKIP_MAPPING=TRUE
export CKV_SKIP_PACKAGE_UPDATE_CHECK=TRUE
unset BC_API_KEY

report_dir="$(mktemp -d)"
trap 'rm -rf "$report_dir"' EXIT

# checkov exits 1 on failed checks; the report below decides, so its status is kept
# only to tell a crash (no report) from findings.
status=0
"$checkov" \
    --directory terraform \
    --framework terraform \
    --skip-download \
    --compact \
    --output json \
    --output-file-path "$report_dir" \
    >/dev/null || status=$?

report="$report_dir/results_json.json"
if [[ ! -s "$report" ]]; then
    echo "checkov produced no report (exit status $status)" >&2
    exit 2
fi

"$venv/bin/python" - "$report" <<'PY'
import json
import sys

with open(sys.argv[1], encoding="utf-8") as handle:
    data = json.load(handle)

# One report per framework; an empty directory gives a bare summary instead.
reports = data if isinstance(data, list) else [data]
totals = {"passed": 0, "failed": 0, "skipped": 0, "parsing_errors": 0}
for report in reports:
    for key in totals:
        totals[key] += int(report.get("summary", {}).get(key, 0))
    results = report.get("results", {})
    for check in results.get("failed_checks", []):
        first, last = check.get("file_line_range", [0, 0])
        print(
            f"FAILED {check['check_id']} {check['check_name']}\n"
            f"       {check['resource']} ({check['repo_file_path']}:{first}-{last})"
        )
    for check in results.get("skipped_checks", []):
        reason = check.get("check_result", {}).get("suppress_comment", "")
        print(f"skipped {check['check_id']} on {check['resource']}: {reason}")
    for path in results.get("parsing_errors", []):
        print(f"PARSE ERROR {path}")

if not (totals["passed"] or totals["failed"] or totals["skipped"]):
    print("checkov evaluated no check: is terraform/ empty?", file=sys.stderr)
    sys.exit(1)
print(
    "checkov summary - passed: {passed}, failed: {failed}, skipped: {skipped}, "
    "parsing errors: {parsing_errors}".format(**totals)
)
sys.exit(1 if totals["failed"] or totals["parsing_errors"] else 0)
PY
