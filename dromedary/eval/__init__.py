"""Benchmarks and their scoring: TruthfulQA and HHH readers, the lm-eval and dromedary protocols, results, the lm-eval model type."""
