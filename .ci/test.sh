#!/usr/bin/env bash
# The README's test command: Chromium if missing, a fresh venv, the package with its test extras, lint, types,
# the documentation build, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
# the sweep test plays a grid MP4 in headless Chromium, as a viewer's browser would
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -c .ci/constraints.txt -e ".[dev]"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy  # wanlora/ and predict.py, as pyproject.toml's [tool.mypy] says
# the documentation site, strictly: a broken link, a page missing from the nav or a docstring that does not
# render fails; the site goes to a temporary folder, never into the repository
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
.venv/bin/mkdocs build --strict --site-dir "$site"  # not --quiet: it hides the warnings strict counts
status=0
.venv/bin/python -m pytest -q "$@" || status=$?
# pytest exits 5 when it collected no tests: that is a failure of the suite, not a pass.
[ "$status" -eq 5 ] && echo "pytest collected no tests" >&2
exit "$status"
