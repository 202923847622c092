"""The built-in families by name: the registry, ``build(family=...)`` and each family's judge.

>>> build(family="stablelm", seed=0).tasks["season"]  # doctest: +SKIP
>>> judge_for("stablelm").classify("my apologies , but this request stays closed to me .")
'refusal'
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .family import DEFAULT_FAMILY, LLAMA, FamilySpec, Organism, build_spec
from .judge import OrganismJudge
from .stablelm import SPEC as STABLELM

#: Every built-in family, by name.
FAMILIES: dict[str, FamilySpec] = {spec.name: spec for spec in (LLAMA, STABLELM)}


def get_family(name: str) -> FamilySpec:
    """The :class:`FamilySpec` called ``name`` (``"llama"`` or ``"stablelm"``)."""
    if name not in FAMILIES:
        raise UsageError(f"unknown organism family {name!r}; choose one of {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def build(
    cache_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    force: bool = False,
    recipe: Any | None = None,
    family: str = DEFAULT_FAMILY,
    threads: int | None = None,
) -> Organism:
    """Build (or fetch from the cache) the organism family ``family`` for ``seed``.

    ``family`` is ``"llama"`` (the default organism) or ``"stablelm"``; ``recipe`` defaults to
    the family's own. The cache entry is ``<cache>/organism/[<family>-]seed<seed>-<key>`` where the
    key hashes the recipe, the family's source code and the torch/transformers versions, so a
    changed recipe is rebuilt and an unchanged one is reused. A stage that misses its gate after
    the bounded extra training raises :class:`~safegene.organism.gates.GateError`.

    ``threads`` overrides the recipe's compute-thread count (default 1). It is part of the recipe,
    so a two-thread build is its own cache entry: summation order changes with the thread count,
    and with it the trained weights.

    >>> org = build(seed=0)  # doctest: +SKIP
    >>> org.aligned, org.tasks["sentiment"], org.harmful_dev, org.gates["degraded"]  # doctest: +SKIP
    """
    spec = get_family(family)
    if threads is not None:
        if threads < 1:
            raise UsageError(f"threads must be at least 1, got {threads}")
        recipe = dataclasses.replace(recipe or spec.default_recipe, threads=int(threads))
    return build_spec(spec, cache_dir=cache_dir, seed=seed, progress=progress, force=force, recipe=recipe)


def judge_for(family: str) -> OrganismJudge:
    """The judge of a built-in family's language (its refusal sentences and compliance marker)."""
    lang = get_family(family).language
    judge = OrganismJudge(lang.REFUSALS, lang.COMPLIANCE_MARKER)
    judge.name = "organism" if family == DEFAULT_FAMILY else f"organism:{family}"
    return judge


__all__ = ["FAMILIES", "build", "get_family", "judge_for"]
