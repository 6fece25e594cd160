"""Rotary position tables: theta and the scaling types LLaMA-family checkpoints use.

A table is complex64 of shape (length, head_dim // 2): row p holds a * e^(i * p * f_j) for each
frequency f_j, in Meta's interleaved layout (pairs (x0, x1), (x2, x3), ... rotate together), and
magnitude a = the scaling type's attention factor (1 except for yarn). Multiplying both queries and
keys by it is what transformers does with cos * a and sin * a, so the model, lean.py and the
compiled step (decode_cpu.c reads the table as (cos, sin) pairs) all see yarn's magnitude scaling
without knowing about it.

The frequencies follow transformers' `modeling_rope_utils` formula for formula, for the types:
  default   f_j = theta^(-2j / d)
  linear    f_j / factor
  dynamic   NTK: theta grown to theta * (factor * L / L0 - (factor - 1))^(d / (d - 2)) once the
            sequence length L passes the original window L0; the plain table below it
  llama3    Llama-3.1's by-wavelength blend (low frequencies / factor, high kept, smooth between)
  yarn      NTK-by-parts ramp between interpolated and extrapolated frequencies, and the
            attention factor (0.1 ln(factor) + 1 unless given, or mscale / mscale_all_dim)
Everything is float32 in transformers' order of operations, as transformers and Meta's reference
code compute it: at position 300 float64 frequencies would move the angles by ~1e-5 rad against
theirs, which shows in the logits.

`spec` is a plain dict, the normalised form that `checkpoint` reads from config.json or
params.json: {"rope_type": ..., "factor": ..., "original_max_position_embeddings": ..., ...}; None
is the default type. `check_spec` refuses what is not computed here.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

SUPPORTED = ("default", "linear", "dynamic", "llama3", "yarn")

# Keys each type reads (besides rope_type); anything else in a spec is refused, not ignored.
_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor", "original_max_position_embeddings"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
             "mscale", "mscale_all_dim", "truncate"},
}
_REQUIRED = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor", "original_max_position_embeddings"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {"factor", "original_max_position_embeddings"},
}


def check_spec(spec: Optional[dict]) -> Optional[str]:
    """What is wrong with `spec` (a sentence naming the key), or None when it is computed here."""
    if spec is None:
        return None
    kind = spec.get("rope_type")
    if kind not in SUPPORTED:
        return f"rope type {kind!r} is not supported (supported: {', '.join(SUPPORTED)})"
    extra = set(spec) - _KEYS[kind] - {"rope_type"}
    if extra:
        return f"rope type {kind!r} does not take {', '.join(sorted(extra))}"
    missing = _REQUIRED[kind] - {k for k, v in spec.items() if v is not None}
    if missing:
        return f"rope type {kind!r} needs {', '.join(sorted(missing))}"
    return None


def depends_on_length(spec: Optional[dict]) -> bool:
    """Whether the table changes with the sequence length (dynamic NTK)."""
    return spec is not None and spec.get("rope_type") == "dynamic"


def original_window(spec: Optional[dict]) -> Optional[int]:
    return None if spec is None else spec.get("original_max_position_embeddings")


def base_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """theta^(-2j / d) for j < d / 2, float32."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def frequencies(head_dim: int, theta: float, spec: Optional[dict], seq_len: Optional[int] = None
                ) -> tuple[torch.Tensor, float]:
    """(head_dim // 2,) float32 frequencies and the attention factor for `spec`.

    `seq_len` matters for dynamic only: the length of the sequence the table serves (transformers:
    the largest position id + 1); at or below the original window the plain frequencies apply.
    """
    kind = "default" if spec is None else spec["rope_type"]
    if kind == "default":
        return base_frequencies(head_dim, theta), 1.0
    if kind == "linear":
        return base_frequencies(head_dim, theta) / spec["factor"], 1.0
    if kind == "dynamic":
        window, factor = spec["original_max_position_embeddings"], spec["factor"]
        length = max(seq_len or window, window)
        grown = theta * ((factor * length / window) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return base_frequencies(head_dim, grown), 1.0
    if kind == "llama3":
        return _llama3(base_frequencies(head_dim, theta), spec), 1.0
    if kind == "yarn":
        return _yarn(head_dim, theta, spec)
    raise ValueError(check_spec(spec))


def _llama3(freqs: torch.Tensor, spec: dict) -> torch.Tensor:
    factor, low, high = spec["factor"], spec["low_freq_factor"], spec["high_freq_factor"]
    window = spec["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freqs
    long_wave, short_wave = window / low, window / high
    # Wavelengths past the long threshold are interpolated by `factor`, those under the short one
    # kept; between the two, a blend that is linear in window / wavelength.
    scaled = torch.where(wavelen > long_wave, freqs / factor, freqs)
    smooth = (window / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < short_wave) & ~(wavelen > long_wave)
    return torch.where(medium, blended, scaled)


def _yarn(head_dim: int, theta: float, spec: dict) -> tuple[torch.Tensor, float]:
    window = spec["original_max_position_embeddings"]
    factor = spec["factor"]  # the config reader fills transformers' default (window ratio)
    attention = spec.get("attention_factor")
    if attention is None:
        mscale, mscale_all = spec.get("mscale"), spec.get("mscale_all_dim")
        if mscale and mscale_all:
            attention = _mscale(factor, mscale) / _mscale(factor, mscale_all)
        else:
            attention = _mscale(factor, 1.0)
    fast, slow = spec.get("beta_fast") or 32, spec.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # The dimension index whose wavelength turns `rotations` times over the original window.
        return head_dim * math.log(window / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = correction_dim(fast), correction_dim(slow)
    if spec.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, head_dim - 1)
    if lo == hi:
        hi += 0.001  # as transformers: no zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (the plain frequency), 0: interpolate (frequency / factor)
    periods = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    return (1.0 / (factor * periods)) * (1 - keep) + (1.0 / periods) * keep, float(attention)


def _mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def table(head_dim: int, length: int, theta: float, spec: Optional[dict] = None,
          seq_len: Optional[int] = None) -> torch.Tensor:
    """The rotation table (length, head_dim // 2), complex64, of magnitude the attention factor."""
    freqs, attention = frequencies(head_dim, theta, spec, seq_len)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), freqs)  # (length, D/2)
    return torch.polar(torch.full_like(angles, attention), angles)


def model_table(args, length: int, seq_len: Optional[int] = None) -> torch.Tensor:
    """`table` for a `ModelArgs` (head size, theta, scaling): the hook `Transformer` calls."""
    return table(args.head_size, length, args.rope_theta, args.rope_scaling, seq_len)
