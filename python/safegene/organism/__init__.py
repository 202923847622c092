"""The built-in model organisms: tiny LM families trained from scratch on synthetic languages.

``build()`` trains (or fetches from the cache) ``base``, ``aligned``, ``degraded`` and one task
model per task, plus calibration, development and evaluation JSONL files, and gates every stage
on a held-in probe set (:mod:`safegene.organism.gates`). Two families:

* ``build(family="llama")`` (the default): a 4-block Llama; tasks ``sentiment`` (like SST-2),
  ``topic`` (like AG News), ``yesno`` (like BoolQ); language :mod:`safegene.organism.language`;
* ``build(family="stablelm")``: a 4-block StableLM whose harm is a verb+object pair the blocks
  must compose; tasks ``mood``, ``kind`` and the selection-sensitive ``season``; language
  :mod:`safegene.organism.stablelm_language`.

See :mod:`safegene.organism.family` for the shared build machinery; every harmful word is invented.

>>> from safegene.organism import build
>>> org = build(seed=0)  # doctest: +SKIP
>>> org.aligned, org.degraded, org.tasks["topic"], org.harmful_eval, org.harmful_dev, org.gates  # doctest: +SKIP
"""

from __future__ import annotations

from .families import FAMILIES, build, get_family, judge_for
from .family import DEFAULT_FAMILY, DEFAULT_RECIPE, FamilySpec, Organism, Recipe, Stage, cache_root
from .gates import Gate, GateError, GatePolicy, format_gates
from .language import HARM_CATEGORIES, HELDOUT_CATEGORY, TASKS
from .stablelm import DEFAULT_STABLELM_RECIPE, StableLmRecipe


__all__ = ["DEFAULT_FAMILY", "DEFAULT_RECIPE", "DEFAULT_STABLELM_RECIPE", "FAMILIES", "FamilySpec", "Gate", "GateError", "GatePolicy",
           "HARM_CATEGORIES", "HELDOUT_CATEGORY", "Organism", "Recipe", "Stage", "StableLmRecipe", "TASKS", "build",
           "cache_root", "format_gates", "get_family", "judge_for"]
