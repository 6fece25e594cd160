"""distributed.pick_dtype: the one dtype choice, tested with a stubbed GPU (no CUDA needed)."""

from __future__ import annotations

import pytest
import torch

from dromedary import distributed


@pytest.fixture
def gpu(monkeypatch):
    """A stand-in CUDA device whose compute capability the test sets. is_bf16_supported() says
    yes on every one of them, as torch does where bf16 is merely emulated (V100, T4)."""
    capability = {"value": (8, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability["value"])
    return capability


@pytest.mark.parametrize("capability, want", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                              ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_emulated_bf16_is_not_picked(gpu, capability, want):
    gpu["value"] = capability
    assert distributed.pick_dtype(torch.device("cuda", 0)) == want
    assert distributed.pick_dtype(torch.device("cuda", 0), "fp32") == torch.float32  # asked for: given
    assert distributed.pick_dtype(torch.device("cpu")) == torch.float32


def test_finetune_refuses_the_fp16_it_would_resolve_to(gpu, tmp_path):
    from dromedary.stages import finetune as ft

    gpu["value"] = (7, 0)  # a V100: no --dtype means fp16, which finetune cannot train in
    data = tmp_path / "sft.jsonl"
    data.write_text('{"id": "a", "instruction": "i", "input": "", "output": "o", "thoughts": "", "source": "s"}\n')
    with pytest.raises(ValueError, match=r"fp16 \(the default on a GPU without native bf16\).*--dtype fp32"):
        ft.finetune(str(data), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    gpu["value"] = (8, 6)
    with pytest.raises(ValueError, match="--dtype fp16 needs loss scaling"):
        ft.finetune(str(data), str(tmp_path / "out"), dtype="fp16")
