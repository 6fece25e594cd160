"""Dromedary: principle-driven self-alignment of LLaMA-family base models."""

__version__ = "0.1.0"
