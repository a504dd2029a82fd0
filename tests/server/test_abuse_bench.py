"""bench/abuse.py's pieces that must be right for its figures to mean anything (nothing timed):
the GGUF copy with a replaced chat template, and the per-phase summary."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import abuse  # noqa: E402


@pytest.mark.slow
def test_with_template_replaces_only_the_template(default_model_path, tmp_path):
    import gguf

    from tinyserve.models.loader import load_model

    template = "{% for m in messages %}[{{ m.role }}|{{ m.content }}]{% endfor %}\u00e9"
    dst = tmp_path / "hostile.gguf"
    abuse.with_template(Path(default_model_path), template, dst)
    src, new = gguf.GGUFReader(default_model_path), gguf.GGUFReader(dst)
    assert bytes(new.fields["tokenizer.chat_template"].parts[-1]).decode() == template
    assert set(src.fields) == set(new.fields)
    for name in src.fields:
        if name != "tokenizer.chat_template":
            assert [bytes(p) for p in src.fields[name].parts] == [bytes(p) for p in new.fields[name].parts]
    assert new.data_offset % 32 == 0
    assert [t.name for t in src.tensors] == [t.name for t in new.tensors]
    for a, b in zip(src.tensors, new.tensors, strict=True):
        assert a.tensor_type == b.tensor_type and (a.data == b.data).all()
    model = load_model(dst)  # tinyserve's own loader validates every offset
    assert (
        model.chat_template.render([{"role": "user", "content": "hi"}], add_generation_prompt=False)
        == "[user|hi]\u00e9"
    )


def test_summary_of_a_phase():
    s = abuse.Samples(
        health=[(0.0, True, 0.004), (1.0, False, 2.0), (5.0, True, 0.001)],
        kv=[(0.0, 3, 100), (1.0, None, None), (2.0, 9, 100), (5.0, 1, 100)],
        rss=[(0.0, 400.0), (2.0, 450.0), (5.0, 300.0)],
        chunks=[(0.5, 1), (1.0, 2), (3.5, 1), (6.0, 1)],
        ttft=[(0.2, 0.3), (3.0, 0.5)],
        victim_errors=[(2.5, "DEADLINE_EXCEEDED")],
    )
    p = abuse.summarize(s, 0.0, 4.0)
    assert (p["health_ok"], p["health_failed"], p["health_max_ms"]) == (1, 1, 4.0)
    assert p["metrics_answered"] == "2/3"
    assert (p["kv_blocks_used_max"], p["kv_blocks_used_last"], p["kv_blocks_total"]) == (9, 9, 100)
    assert (p["rss_mib_max"], p["rss_mib_last"]) == (450.0, 450.0)
    assert p["victim_tokens_per_s"] == 1.0  # 4 tokens in 4 s
    assert p["victim_max_gap_ms"] == 2500.0  # 1.0 -> 3.5
    assert (p["victim_ttft_ms_median"], p["victim_ttft_ms_max"]) == (400.0, 500.0)
    assert p["victim_errors"] == ["DEADLINE_EXCEEDED"]
