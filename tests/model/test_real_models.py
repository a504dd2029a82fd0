"""The two real Q4_K_M files of the catalog (Gemma 3 270M: gemma3, Q5_0/Q4_K/Q6_K/Q8_0; Qwen2.5-Coder
0.5B: qwen2, Q5_0/Q4_K/Q6_K/Q8_0) through the whole engine, against implementations someone else
wrote:

- Hugging Face transformers reads the same GGUF file (its own GGUF reader, which dequantizes with the
  `gguf` package) into its own model classes and computes the logits in float64. On each prompt
  plus tinyserve's own greedy continuation, tinyserve's top-1 token must equal transformers' at
  every position where transformers' two best logits are further apart than the tolerance.
- llama.cpp's `llama-perplexity` (when bench/build_llamacpp.sh has built it, or $LLAMA_CPP_BIN
  points at it): tinyserve's perplexity on the same text within 2%.

Tolerance: tinyserve rounds activations to int8 before every quantized matmul (transformers computes
in float64 from the dequantized weights), which moves the largest logit error to 1-4% of the largest
logit on these models (measured on Gemma 3 270M by tools/gemma3_vs_transformers.py: 1.2e-2 to 4.2e-2).
Rows whose top-2 margin is below 6% of the largest logit are near ties and not compared.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

MARGIN = 0.06
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Water boils at 100 degrees Celsius because",
    "Once upon a time, there was a little",
]
GENERATE = 24
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
from vs_transformers import hf_from_gguf, tinyserve_logits  # noqa: E402

PPL_TEXT = Path("/usr/share/common-licenses/GPL-3")  # Debian's base-files: ~8k tokens of English


def _hf_model(path: Path, arch: str):
    torch = pytest.importorskip("torch", reason="the transformers reference needs torch")
    pytest.importorskip("transformers")
    return torch, hf_from_gguf(str(path), arch)


@pytest.fixture(scope="module", params=["gemma3", "qwen2"])
def real(request, gemma3_path, qwen25_coder_path):
    from tinyserve.llm import LLM

    path = gemma3_path if request.param == "gemma3" else qwen25_coder_path
    return request.param, Path(path), LLM(str(path))


def test_greedy_text_and_top1_match_transformers(real):
    from tinyserve.engine.params import SamplingParams, StoppingParams

    arch, path, llm = real
    torch, hf = _hf_model(path, arch)
    compared = 0
    for prompt in PROMPTS:
        prompt_ids = llm.tokenize(prompt)
        text = llm.generate_text(
            prompt_ids, SamplingParams(temperature=0), StoppingParams(max_tokens=GENERATE, ignore_eos=True)
        )
        out_ids = llm.last_stats.token_ids
        assert len(out_ids) == GENERATE and text.strip(), (arch, prompt, text)
        ids = list(prompt_ids) + list(out_ids)
        ours = tinyserve_logits(llm.model.core, ids)
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([ids]), use_cache=False).logits[0].double().numpy()
        assert ours.shape == ref.shape
        # the engine's greedy tokens are the argmax of its own logits over the whole sequence
        assert list(ours[len(prompt_ids) - 1 : -1].argmax(1)) == list(out_ids), (arch, prompt)
        top = np.sort(ref, axis=1)
        clear = top[:, -1] - top[:, -2] > MARGIN * np.abs(ref).max()
        compared += int(clear.sum())
        np.testing.assert_array_equal(ours.argmax(1)[clear], ref.argmax(1)[clear], err_msg=f"{arch}: {prompt!r}")
    assert compared >= 20, f"{arch}: only {compared} rows with a clear margin"


def _llama_perplexity_bin() -> Path | None:
    d = Path(os.environ.get("LLAMA_CPP_BIN", ROOT / "build" / "llamacpp" / "bin"))
    exe = d / "llama-perplexity"
    return exe if exe.is_file() and os.access(exe, os.X_OK) else None


def test_perplexity_close_to_llama_cpp(real, tmp_path):
    arch, path, llm = real
    exe = _llama_perplexity_bin()
    if exe is None:
        pytest.skip("llama-perplexity is not built (bench/build_llamacpp.sh, or set $LLAMA_CPP_BIN)")
    if not PPL_TEXT.is_file():
        pytest.skip(f"{PPL_TEXT} (Debian's base-files) is not on this machine")
    text = PPL_TEXT.read_text(encoding="utf-8")[:9000]  # ~2k tokens: 4 windows of 512
    f = tmp_path / "text.txt"
    f.write_text(text, encoding="utf-8")
    r = subprocess.run(
        [str(exe), "-m", str(path), "-f", str(f), "-c", "512", "-t", str(os.cpu_count() or 2)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", r.stdout + r.stderr)
    assert m, (r.stdout + r.stderr)[-2000:]
    theirs = float(m.group(1))
    ours = llm.perplexity(text, ctx=512).ppl
    assert abs(ours - theirs) / theirs < 0.02, f"{arch}: tinyserve {ours:.4f} vs llama.cpp {theirs:.4f}"
