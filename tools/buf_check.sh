#!/usr/bin/env bash
# The contract's checks: `buf lint` (STANDARD + COMMENTS, buf.yaml) and `buf breaking` (FILE)
# against the previous main.
#
#   tools/buf_check.sh                 # against the previous main (below)
#   BUF_AGAINST=REV tools/buf_check.sh # against any commit, e.g. origin/main or a release tag
#
# "The previous main": on main's tip (CI runs in a fresh clone of main), its first parent HEAD^1,
# the main that a merge or a commit landed on; on any other branch, its merge base with main
# (or origin/main), where the branch started; in a clone with neither, HEAD^1. The base's proto/ and buf.yaml come out of git (git archive), so this
# works in any clone that has that commit: a shallow clone must fetch it first (git fetch --deepen=N).
# A base without buf.yaml predates these checks (the v1 renames that made the proto lint-clean
# landed with buf.yaml): breaking is then skipped, saying so; every later change is checked.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v buf >/dev/null || { echo "buf not found: pip install buf-bin (in the [test] extra)" >&2; exit 1; }

buf lint
echo "buf lint: ok"

if [ -n "${BUF_AGAINST:-}" ]; then
  base=$(git rev-parse --verify -q "${BUF_AGAINST}^{commit}") \
    || { echo "buf breaking: BUF_AGAINST=$BUF_AGAINST is not a commit here" >&2; exit 1; }
else
  main=$(git rev-parse --verify -q "refs/heads/main^{commit}" \
         || git rev-parse --verify -q "refs/remotes/origin/main^{commit}" || true)
  if [ -z "$main" ] || [ "$(git rev-parse HEAD)" = "$main" ]; then   # no main here: HEAD^1 too
    base=$(git rev-parse --verify -q "HEAD^1") \
      || { echo "buf breaking: HEAD has no parent here (shallow clone? git fetch --deepen=1)" >&2; exit 1; }
  else
    base=$(git merge-base HEAD "$main") \
      || { echo "buf breaking: no merge base with main (shallow clone? git fetch --unshallow)" >&2; exit 1; }
  fi
fi

short=$(git rev-parse --short "$base")
if ! git cat-file -e "$base:buf.yaml" 2>/dev/null; then
  echo "buf breaking: skipped: the base $short has no buf.yaml (it predates the buf checks)"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git archive "$base" buf.yaml proto | tar -x -C "$tmp"
buf breaking --against "$tmp"
echo "buf breaking: ok against $short"
