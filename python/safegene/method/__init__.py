"""The SafeGene method on a loaded model: key selection, the differentiable merge and few-shot
calibration of the per-key coefficients."""
