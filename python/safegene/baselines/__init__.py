"""Coefficient policies: SafeGene, its ablations and the baselines it is compared with (RESTA's
uniform γ, the SafeMERGE-style cosine rule), as one registry that the demo and the benchmarks
loop over.

>>> from safegene.baselines import get, names
>>> names()[:3]
['none', 'RESTA', 'SafeMERGE']
>>> get("RESTA").slug
'resta'
"""

from .registry import (DEFAULT_METHODS, POLICIES, Context, Policy, Settings, compute, get, iter_policies,
                       lam_summary, names, select)

__all__ = ["DEFAULT_METHODS", "POLICIES", "Context", "Policy", "Settings", "compute", "get", "iter_policies",
           "lam_summary", "names", "select"]
