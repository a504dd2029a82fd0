#!/usr/bin/env bash
# The linters CI runs (.ci/run): ruff (lint + format), mypy (strict on engine/ and tenancy/), and
# clang-format on csrc/ and the C++ tests. Any finding fails. `tools/lint.sh --fix` rewrites the
# tree instead (ruff's safe fixes, ruff format, clang-format -i); review the diff before committing.
# Versions: the `lint` extra of pyproject.toml (pip install '.[lint]').
set -euo pipefail
cd "$(dirname "$0")/.."
fix=0
[ "${1:-}" = "--fix" ] && fix=1
cpp_files() { git ls-files 'csrc/*.cpp' 'csrc/*.h' 'csrc/*.cu' 'csrc/*.cuh' 'tests/*.cpp' 'tests/*.h'; }
rc=0
if [ "$fix" = 1 ]; then
  ruff check --fix --quiet . || true
  ruff format --quiet .
  cpp_files | xargs clang-format -i
  exit 0
fi
echo "ruff check:";        ruff check --quiet . || rc=1
echo "ruff format:";       ruff format --check --quiet . || rc=1
echo "mypy:";              mypy || rc=1
echo "clang-format:";      cpp_files | xargs clang-format --dry-run -Werror || rc=1
[ "$rc" = 0 ] && echo "lint: clean"
exit "$rc"
