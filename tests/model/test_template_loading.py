"""Choosing a model's chat template at load: the file's, validated on sample conversations; a
template that fails (syntax, a limit, refusing everything) is a load error naming the model and
the problem, or ChatML with a WARNING under --chat-template-fallback chatml; `tinyserve info`
and `tinyserve serve` say which one is in use, truthfully."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
from tiny_models import CHATML_TEMPLATE, TinySpec, write_tiny_model

from tinyserve.models.chat_template import CHATML_TEMPLATE as OUR_CHATML
from tinyserve.models.loader import ModelLoadError, load_model

SYNTAX_ERROR = "{% for m in messages %}{{ m.content }}"  # no endfor
OVER_BUDGET = "{% for m in messages %}{{ m.content * 10**8 }}{% endfor %}"
REFUSES_ALL = "{{ raise_exception('this template serves nobody') }}"


@pytest.fixture
def model_file(tmp_path):
    def make(template: str | None):
        return write_tiny_model(tmp_path / "m.gguf", TinySpec(), chat_template=template)

    return make


def test_a_valid_template_is_used_and_said_so(model_file):
    m = load_model(model_file(CHATML_TEMPLATE), "ok")
    assert m.chat_template.source == CHATML_TEMPLATE
    assert m.chat_template_origin == "from the file (validated at load)"


def test_a_file_without_a_template_gets_chatml(model_file):
    m = load_model(model_file(None), "none")
    assert m.chat_template.source == OUR_CHATML
    assert m.chat_template_origin == "ChatML (the file has no chat template)"


@pytest.mark.parametrize(
    "template, problem",
    [
        (SYNTAX_ERROR, "syntax error"),
        (OVER_BUDGET, "max_output_chars"),
        (REFUSES_ALL, "this template serves nobody"),
    ],
)
def test_a_failing_template_is_a_load_error(model_file, template, problem):
    path = model_file(template)
    with pytest.raises(ModelLoadError) as e:
        load_model(path, "bad")
    msg = str(e.value)
    assert f"model bad ({path})" in msg and problem in msg and "--chat-template-fallback chatml" in msg


@pytest.mark.parametrize("template, problem", [(SYNTAX_ERROR, "syntax error"), (OVER_BUDGET, "max_output_chars")])
def test_the_fallback_flag_serves_chatml_with_a_warning(model_file, template, problem, caplog):
    with caplog.at_level(logging.WARNING, logger="tinyserve.models"):
        m = load_model(model_file(template), "bad", chat_template_fallback="chatml")
    assert m.chat_template.source == OUR_CHATML
    assert m.chat_template_origin.startswith("ChatML fallback (--chat-template-fallback chatml)")
    assert problem in m.chat_template_origin
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "model bad" in warnings[0].getMessage() and problem in warnings[0].getMessage()


def test_an_unknown_fallback_is_refused(model_file):
    with pytest.raises(ModelLoadError, match="unknown chat template fallback 'llama2'"):
        load_model(model_file(CHATML_TEMPLATE), chat_template_fallback="llama2")


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tinyserve.cli", *args], capture_output=True, text=True, timeout=120)


def test_info_says_which_template_is_in_use(model_file):
    line = lambda out: next(x for x in out.splitlines() if x.startswith("chat template:"))  # noqa: E731
    path = str(model_file(CHATML_TEMPLATE))
    assert line(_cli("info", "--model", path).stdout).endswith("from the file (validated at load)")
    path = str(model_file(SYNTAX_ERROR))
    r = _cli("info", "--model", path)
    assert r.returncode == 0, r.stderr
    assert "FAILS validation" in line(r.stdout) and "syntax error" in line(r.stdout)
    assert "refuses this model unless --chat-template-fallback chatml" in line(r.stdout)
    r = _cli("info", "--model", path, "--chat-template-fallback", "chatml")
    assert "ChatML fallback (--chat-template-fallback chatml)" in line(r.stdout)
    path = str(model_file(None))
    assert line(_cli("info", "--model", path).stdout).endswith("ChatML (the file has no chat template)")


def test_serve_refuses_a_model_whose_template_fails(model_file):
    path = str(model_file(OVER_BUDGET))
    r = _cli("serve", "--port", "0", "--model", f"bad={path}")
    assert r.returncode == 1
    assert "cannot serve: model bad" in r.stderr and "max_output_chars" in r.stderr
    assert "Traceback" not in r.stderr
