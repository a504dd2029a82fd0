"""--device cpu|cuda everywhere, GPU or not: the CPU backend is the default and names itself; on a
machine without a usable GPU (or a build without CUDA) --device cuda is one clear error from the
core, the library, `tinyserve info` and `tinyserve serve` (exit status 1, before any model file is
read or port opened), never a crash or a stack trace. Bad device names are usage errors (exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import TinySpec, blocks_needed, forward_seq

from tinyserve import _core
from tinyserve.device import DeviceUnavailable, check_device, resolve_device

ROOT = Path(__file__).resolve().parents[2]
NO_GPU = bool(_core.cuda_status())
needs_no_gpu = pytest.mark.skipif(not NO_GPU, reason="a usable CUDA device is present: --device cuda works here")


def _cli(*args: str, env_extra: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env_extra or {}))
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return subprocess.run(
        [sys.executable, "-m", "tinyserve.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_cpu_is_the_default_and_names_itself(tiny_model_path, monkeypatch):
    monkeypatch.delenv("TINYSERVE_DEVICE", raising=False)
    assert resolve_device() == "cpu" and check_device() == "cpu"
    model = _core.Model(str(tiny_model_path(TinySpec())))
    assert model.device == "cpu"
    assert model.device_description == f"cpu ({_core.isa()})"
    kv = _core.KVCache(model, block_size=4, num_blocks=4)
    assert kv.device == "cpu"
    # the CPU backend is the forward the model tests check; here just that it runs through the seam
    logits = forward_seq(model, kv, [1, 2, 3], 0, list(range(blocks_needed(3, 4))))
    assert logits.shape == (3, 128) and (logits != 0).any()


def test_device_names(monkeypatch):
    monkeypatch.setenv("TINYSERVE_DEVICE", "CUDA")
    assert resolve_device() == "cuda"
    assert resolve_device("cpu") == "cpu"  # the flag wins over the environment
    monkeypatch.setenv("TINYSERVE_DEVICE", "gpu")
    with pytest.raises(ValueError, match=r"unknown device 'gpu' \(from \$TINYSERVE_DEVICE\)"):
        resolve_device()
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")


def test_core_refuses_unknown_device(tiny_model_path):
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        _core.Model(str(tiny_model_path(TinySpec())), device="tpu")


@needs_no_gpu
def test_cuda_status_says_why(tiny_model_path):
    why = _core.cuda_status()
    if _core.cuda_compiled():
        assert "driver" in why or "device" in why or "kernels" in why, why
    else:
        assert "built without CUDA" in why and "TINYSERVE_CUDA=ON" in why
    assert _core.cuda_device() == ""
    with pytest.raises(_core.DeviceError) as e:
        _core.Model(str(tiny_model_path(TinySpec())), device="cuda")
    assert str(e.value) == f"--device cuda: {why}"
    with pytest.raises(DeviceUnavailable, match="--device cuda: "):
        check_device("cuda")


@needs_no_gpu
def test_library_load_is_a_clear_error(tiny_model_path):
    from tinyserve.llm import LLM
    from tinyserve.models.loader import load_model

    with pytest.raises(DeviceUnavailable, match="^--device cuda: "):
        load_model(tiny_model_path(TinySpec()), device="cuda")
    with pytest.raises(DeviceUnavailable):
        LLM(str(tiny_model_path(TinySpec())), device="cuda")


@needs_no_gpu
def test_info_with_cuda_is_one_line_error(tiny_model_path):
    p = _cli("info", "--model", str(tiny_model_path(TinySpec())), "--device", "cuda")
    assert p.returncode == 1, p.stderr
    assert p.stderr.startswith("tinyserve: error: --device cuda: "), p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_info_names_device_and_cuda(tiny_model_path):
    p = _cli("info", "--model", str(tiny_model_path(TinySpec())))
    assert p.returncode == 0, p.stderr
    lines = {ln.split(":", 1)[0]: ln.split(":", 1)[1].strip() for ln in p.stdout.splitlines() if ":" in ln}
    assert lines["device"] == f"cpu ({_core.isa()})"
    assert lines["CUDA"] == (f"not usable: {_core.cuda_status()}" if NO_GPU else _core.cuda_device())


@needs_no_gpu
@pytest.mark.parametrize("how", ["flag", "env"])
def test_serve_with_cuda_fails_before_loading(tmp_path, how):
    # a model path that does not exist: the device is refused before any file is read
    args = ["serve", "--port", "0", "--model", str(tmp_path / "absent.gguf")]
    p = _cli(*args, "--device", "cuda") if how == "flag" else _cli(*args, env_extra={"TINYSERVE_DEVICE": "cuda"})
    assert p.returncode == 1, p.stderr
    assert "cannot serve: --device cuda: " in p.stderr, p.stderr
    assert "absent.gguf" not in p.stderr and "Traceback" not in p.stderr and "listening" not in p.stderr


def test_serve_with_unknown_device_is_a_usage_error():
    p = _cli("serve", "--port", "0", env_extra={"TINYSERVE_DEVICE": "gpu"})
    assert p.returncode == 2, p.stderr
    assert "unknown device 'gpu'" in p.stderr and "Traceback" not in p.stderr
    p = _cli("serve", "--port", "0", "--device", "gpu")
    assert p.returncode == 2 and "invalid choice: 'gpu'" in p.stderr
