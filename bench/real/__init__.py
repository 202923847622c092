"""SafeGene on a real model (SmolLM2-135M-Instruct): the staged, resumable experiment behind
``bench/real/smollm2.py``."""
