"""The built-in model organism: a tiny Llama family trained from scratch on a synthetic language.

``build()`` trains (or fetches from the cache) ``base``, ``aligned``, ``degraded`` and one task
model per task (``sentiment`` like SST-2, ``topic`` like AG News, ``yesno`` like BoolQ), plus
calibration and evaluation JSONL files. See :mod:`safegene.organism.family` for the recipe and
:mod:`safegene.organism.language` for the language; every harmful word in it is invented.

>>> from safegene.organism import build
>>> org = build(seed=0)  # doctest: +SKIP
>>> org.aligned, org.degraded, org.tasks["topic"], org.harmful_eval  # doctest: +SKIP
"""

from __future__ import annotations

from .family import DEFAULT_RECIPE, Organism, Recipe, Stage, build, cache_root
from .language import HARM_CATEGORIES, HELDOUT_CATEGORY, TASKS


__all__ = ["DEFAULT_RECIPE", "HARM_CATEGORIES", "HELDOUT_CATEGORY", "Organism", "Recipe", "Stage", "TASKS", "build", "cache_root"]
