"""Measuring a model: prompt sets, judges, ASR / task accuracy / over-refusal, plots."""
