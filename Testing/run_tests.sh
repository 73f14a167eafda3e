#!/usr/bin/env bash
# Installs the project with its test extras (pinned by constraints.txt) and runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test,slicer]"
python3 -m pytest Testing -q "$@"
