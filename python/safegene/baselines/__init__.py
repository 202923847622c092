"""Coefficient policies SafeGene is compared with: RESTA's uniform γ and the SafeMERGE-style
cosine rule."""
