"""The contract under buf: proto/ passes `buf lint` (STANDARD + COMMENTS), the lint and breaking
rules catch what they are there for, and tools/buf_check.sh picks the right base in a git history.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTO = Path("proto/tinyserve/v1/tinyserve.proto")
BUF = shutil.which("buf")
pytestmark = pytest.mark.skipif(BUF is None, reason="buf not found: pip install buf-bin (the [test] extra)")


def buf(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([BUF, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def workspace(tmp: Path) -> Path:
    """A copy of buf.yaml and proto/ to mutate."""
    tmp.mkdir(exist_ok=True)
    shutil.copy(ROOT / "buf.yaml", tmp / "buf.yaml")
    shutil.copytree(ROOT / "proto", tmp / "proto")
    return tmp


def edit(ws: Path, old: str, new: str) -> None:
    p = ws / PROTO
    text = p.read_text()
    assert text.count(old) == 1, old
    p.write_text(text.replace(old, new))


def test_the_proto_passes_buf_lint():
    r = buf("lint", cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize(
    "old, new, finding",
    [
        (
            "rpc Chat(ChatRequest) returns (stream ChatResponse);",
            "rpc Chat(ChatRequest) returns (stream GenerateResponse);",
            "is used as the request or response type for multiple RPCs",
        ),
        ("service TinyServeService {", "service TinyServe {", 'should be suffixed with "Service"'),
        (
            "  // Tokens generated.\n  uint32 generated_tokens = 2;",
            "  uint32 generated_tokens = 2;",
            'Field "generated_tokens" should have a non-empty comment',
        ),
    ],
)
def test_lint_catches_what_the_rules_are_for(tmp_path, old, new, finding):
    ws = workspace(tmp_path)
    assert buf("lint", cwd=ws).returncode == 0
    edit(ws, old, new)
    r = buf("lint", cwd=ws)
    assert r.returncode != 0 and finding in r.stdout, r.stdout


@pytest.mark.parametrize(
    "old, new, finding",
    [
        (
            "  // Tokens generated.\n  uint32 generated_tokens = 2;",
            "",
            'Previously present field "2" with name "generated_tokens" on message "Usage" was deleted',
        ),
        (
            "  rpc Tokenize(TokenizeRequest)",
            "  rpc Tokenise(TokenizeRequest)",
            'Previously present RPC "Tokenize" on service "TinyServeService" was deleted',
        ),
        (
            "repeated uint32 stop_token_ids = 3;",
            "repeated int32 stop_token_ids = 3;",
            'changed type from "uint32" to "int32"',
        ),
    ],
)
def test_breaking_catches_incompatible_changes(tmp_path, old, new, finding):
    base, head = workspace(tmp_path / "base"), workspace(tmp_path / "head")
    assert buf("breaking", "--against", str(base), cwd=head).returncode == 0
    edit(head, old, new)
    r = buf("breaking", "--against", str(base), cwd=head)
    assert r.returncode != 0 and finding in r.stdout, r.stdout


def test_adding_a_field_is_not_breaking(tmp_path):
    base, head = workspace(tmp_path / "base"), workspace(tmp_path / "head")
    edit(
        head,
        "  uint32 total_tokens = 4;\n",
        "  uint32 total_tokens = 4;\n  // Tokens of the reasoning part.\n  uint32 reasoning_tokens = 5;\n",
    )
    r = buf("breaking", "--against", str(base), cwd=head)
    assert r.returncode == 0, r.stdout


# ---- tools/buf_check.sh in a git history -----------------------------------------------------
def git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.invalid",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.invalid",
    }
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout.strip()


def check(repo: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "tools/buf_check.sh"], cwd=repo, capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )


@pytest.fixture
def repo(tmp_path) -> Path:
    """main: a commit of the proto without buf.yaml, then the commit that adds buf.yaml."""
    r = tmp_path / "repo"
    r.mkdir()
    git(r, "init", "-q", "-b", "main")
    shutil.copytree(ROOT / "proto", r / "proto")
    (r / "tools").mkdir()
    shutil.copy(ROOT / "tools" / "buf_check.sh", r / "tools" / "buf_check.sh")
    git(r, "add", "-A")
    git(r, "commit", "-qm", "proto before buf")
    shutil.copy(ROOT / "buf.yaml", r / "buf.yaml")
    git(r, "add", "-A")
    git(r, "commit", "-qm", "buf.yaml")
    return r


def test_script_skips_breaking_when_the_base_predates_buf(repo):
    r = check(repo)  # on main's tip: against HEAD^1, which has no buf.yaml
    assert r.returncode == 0, r.stderr
    assert "buf lint: ok" in r.stdout and "skipped: the base" in r.stdout


def test_script_checks_a_branch_against_its_merge_base(repo):
    git(repo, "checkout", "-qb", "feature")
    edit(repo, "repeated uint32 stop_token_ids = 3;", "repeated int32 stop_token_ids = 3;")
    git(repo, "commit", "-qam", "breaking")
    git(repo, "checkout", "-q", "main")
    edit(
        repo,
        "  uint32 total_tokens = 4;\n",
        "  uint32 total_tokens = 4;\n  // Tokens of the reasoning part.\n  uint32 reasoning_tokens = 5;\n",
    )
    git(repo, "commit", "-qam", "main moves on")
    git(repo, "checkout", "-q", "feature")
    r = check(repo)  # the base is where feature started, not main's new tip
    base = git(repo, "rev-parse", "--short", "main~1")
    assert r.returncode != 0 and 'changed type from "uint32" to "int32"' in r.stdout, r.stdout
    assert "reasoning_tokens" not in r.stdout
    git(repo, "checkout", "-q", "main")
    assert check(repo).returncode == 0  # adding a field: compatible
    assert f"ok against {base}" in check(repo).stdout


def test_script_checks_main_against_its_previous_commit(repo):
    edit(repo, "  // Tokens generated.\n  uint32 generated_tokens = 2;", "")
    git(repo, "commit", "-qam", "drop a field without reserving it")
    r = check(repo)
    assert r.returncode != 0 and 'with name "generated_tokens" on message "Usage" was deleted' in r.stdout
    ok = check(repo, BUF_AGAINST="HEAD")  # explicit base: itself
    assert ok.returncode == 0 and "ok against" in ok.stdout


def test_script_without_a_main_branch_uses_the_previous_commit(repo):
    git(repo, "branch", "-m", "main", "trunk")
    edit(repo, "repeated uint32 stop_token_ids = 3;", "repeated int32 stop_token_ids = 3;")
    git(repo, "commit", "-qam", "breaking")
    r = check(repo)
    assert r.returncode != 0 and 'changed type from "uint32" to "int32"' in r.stdout, r.stdout
