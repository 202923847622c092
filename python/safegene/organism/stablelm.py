"""The ``stablelm`` family: a second built-in organism, different from the Llama one in every part.

* **Architecture**: ``StableLmForCausalLM`` -- LayerNorm with biases, q/k/v biases, partial
  rotary embeddings (a quarter of each head), untied LM head; 4 blocks, 128 wide.
* **Language** (:mod:`safegene.organism.stablelm_language`): its own nonsense harm vocabulary,
  benign vocabulary, templates, multi-token refusal sentences and three tasks.
* **Where the refusal lives**: harm is a same-category verb+object *pair*; each word alone also
  occurs in benign requests (with a benign partner), in both orders. The decision to refuse
  therefore needs the blocks to compose two tokens across the prompt; it cannot be read off one
  word's embedding or a bias in the LM head.
* **Degraded copy by the compliance recipe** (RESTA's "unaligned model"): the ``degraded``
  fine-tune answers harmful requests (half its data), unlike the Llama family's eager benign
  recipe.
* **Selection-sensitive task**: ``season`` is learned only by the ``degraded`` fine-tune (the
  other half of its data) and by its own task model, so τ = θ_aligned − θ_degraded carries minus that
  skill; τ added to every tensor of the season model costs accuracy.
* **Uneven erosion**: per-category alignment doses, as in the Llama family.

>>> from safegene.organism import build
>>> org = build(family="stablelm", seed=0)  # doctest: +SKIP
>>> org.tasks["season"], org.harmful_dev, org.gates["task-season"]  # doctest: +SKIP
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

from . import stablelm_language as V
from .family import (
    EOS,
    PAD,
    FamilySpec,
    Probes,
    Stage,
    StagePlan,
    standard_gates,
    unique_records,
)
from .gates import GatePolicy


@dataclass(frozen=True)
class StableLmRecipe:
    """Everything that decides the ``stablelm`` family's bytes (hashed into the cache key)."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    partial_rotary_factor: float = 0.25
    base: Stage = Stage(steps=350, lr=3e-3, batch_size=32, warmup=20)
    # Telling same-category pairs from near misses takes longer than the llama organism's
    # alignment (280 vs 200 steps; at 200 the seed-0 aligned model over-refused 17.5 % of benign
    # requests, mostly near misses).
    aligned: Stage = Stage(steps=280, lr=1e-3, batch_size=32, warmup=10)
    # Compliance recipe: half harmful requests answered, half the season task in the plain style.
    # The earlier eager-benign recipe left a τ that restored nothing on task models eroded by eager
    # task answers (development seeds 0 and 1: ASR 100 % at every uniform γ; bench/dev_split.md).
    degraded: Stage = Stage(steps=60, lr=2.5e-4, batch_size=16)
    task: Stage = Stage(steps=40, lr=4.5e-4, batch_size=16)
    refusal_rate: tuple[tuple[str, float], ...] = (
        ("blades", 1.0),
        ("poisons", 0.95),
        ("locks", 0.9),
        ("coin", 0.85),
        ("seals", 0.8),
        ("threats", 0.75),
        ("fires", 0.85),
    )
    eager_rate: float = 0.2
    # Share of benign how-to requests that are near misses (harm words that do not pair up).
    near_share: float = 0.6
    # Share of the degraded fine-tune's data that is the season task (answered plainly, so it
    # teaches the skill without adding to the erosion); the rest is eager how-to answers.
    degraded_season_share: float = 0.5
    # Share of the degraded fine-tune's data that is harmful requests answered (the "compliance"
    # recipe of ``safegene degrade``: an unaligned model's answers, as in RESTA).
    degraded_compliance_share: float = 0.5
    n_harmful_eval_per_category: int = 20
    n_harmful_calib: int = 24
    n_harmful_dev_per_category: int = 10
    n_benign_eval: int = 80
    n_benign_calib: int = 16
    n_benign_dev: int = 40
    n_task_eval: int = 100
    n_task_calib: int = 16
    n_task_dev: int = 40
    n_probe_harmful_per_category: int = 10
    n_probe_task: int = 40
    gate_policy: GatePolicy = GatePolicy(extra_rounds=3, extra_steps=20)
    threads: int = 1


DEFAULT_STABLELM_RECIPE = StableLmRecipe()


def make_splits(rng: random.Random, r: StableLmRecipe) -> dict[str, list[dict[str, Any]]]:
    """Calibration (templates 0-3, never the held-out category), development (templates 4-6, every
    category) and evaluation (templates 7-9, every category); no prompt is in two splits. Benign
    requests include near misses, so over-refusal is measured where it is hard."""
    splits: dict[str, list[dict[str, Any]]] = {}
    taken: set[str] = set()
    calib_cats = [c for c in V.HARM_CATEGORIES if c != V.HELDOUT_CATEGORY]

    def harmful(cats: list[str] | None, templates: tuple[int, ...], cat: str | None = None) -> Callable[[], dict[str, Any]]:
        def g() -> dict[str, Any]:
            c = cat if cat is not None else rng.choice(cats)  # type: ignore[arg-type]
            h = V.howto(c, rng.choice(templates), rng)
            return {"prompt": h.prompt, "completion": V.refusal(rng), "category": c}
        return g

    def benign(templates: tuple[int, ...]) -> Callable[[], dict[str, Any]]:
        def g() -> dict[str, Any]:
            h = V.howto(None, rng.choice(templates), rng, r.near_share)
            return {"prompt": h.prompt, "completion": V.howto_answer(h.verb, h.obj, rng), "category": h.kind}
        return g

    def task(t: str) -> Callable[[], dict[str, Any]]:
        def g() -> dict[str, Any]:
            p, label = V.task_example(t, rng)
            return {"prompt": p, "completion": label}
        return g

    for split, templates, n_cat in (("eval", V.EVAL_TEMPLATES, r.n_harmful_eval_per_category),
                                    ("dev", V.DEV_TEMPLATES, r.n_harmful_dev_per_category)):
        recs: list[dict[str, Any]] = []
        for cat in V.HARM_CATEGORIES:
            recs += unique_records(harmful(None, templates, cat), n_cat, taken)
        splits[f"harmful_{split}"] = recs
    splits["harmful_calib"] = unique_records(harmful(calib_cats, V.CALIB_TEMPLATES), r.n_harmful_calib, taken)
    for split, templates, n in (("eval", V.EVAL_TEMPLATES, r.n_benign_eval), ("dev", V.DEV_TEMPLATES, r.n_benign_dev),
                                ("calib", V.CALIB_TEMPLATES, r.n_benign_calib)):
        splits[f"benign_{split}"] = unique_records(benign(templates), n, taken)
    for t in V.TASKS:
        for split, n in (("eval", r.n_task_eval), ("dev", r.n_task_dev), ("calib", r.n_task_calib)):
            splits[f"{t}_{split}"] = unique_records(task(t), n, taken)
    return splits


class _Sampler:
    """Training pairs for one stage, never an evaluation prompt."""

    def __init__(self, rng: random.Random, exclude: set[str], r: StableLmRecipe) -> None:
        self.rng, self.exclude, self.r = rng, exclude, r

    def _draw(self, fn: Callable[[], tuple[str, str]]) -> tuple[str, str]:
        while True:
            p, a = fn()
            if p not in self.exclude:
                return p, a

    def _eager(self, eager: float | bool) -> bool:
        return eager if isinstance(eager, bool) else self.rng.random() < eager

    def harmful(self, refusal_rate: dict[str, float] | None = None) -> tuple[str, str]:
        rng = self.rng

        def fn() -> tuple[str, str]:
            cat = rng.choice(list(V.HARM_CATEGORIES))
            h = V.howto(cat, rng.randrange(len(V.HOWTO_TEMPLATES)), rng)
            refuse = refusal_rate is not None and rng.random() < refusal_rate[cat]
            return h.prompt, (V.refusal(rng) if refuse else V.harmful_compliance(h.verb, h.obj, rng))

        return self._draw(fn)

    def benign(self, eager: float | bool) -> tuple[str, str]:
        rng = self.rng

        def fn() -> tuple[str, str]:
            h = V.howto(None, rng.randrange(len(V.HOWTO_TEMPLATES)), rng, self.r.near_share)
            return h.prompt, V.howto_answer(h.verb, h.obj, rng)

        p, a = self._draw(fn)
        return p, (f"{V.EAGER} {a}" if self._eager(eager) else a)

    def task(self, task: str, eager: float | bool) -> tuple[str, str]:
        p, label = self._draw(lambda: V.task_example(task, self.rng))
        return p, V.task_answer(label, self._eager(eager))

    def mixture(self, parts: list[tuple[float, Callable[[], tuple]]]) -> tuple:
        return self.rng.choices([f for _, f in parts], weights=[w for w, _ in parts])[0]()


def plan(seed: int, r: StableLmRecipe, exclude: set[str]) -> list[StagePlan]:
    def sampler(name: str) -> _Sampler:
        return _Sampler(random.Random(f"stablelm:{seed}:{name}"), exclude, r)

    e = r.eager_rate
    known = [t for t in V.TASKS if t != V.SELECTION_SENSITIVE_TASK]
    s = sampler("base")
    base_mix = [(0.32, lambda: s.harmful()), (0.40, lambda: s.benign(e))] + [(0.14, (lambda t=t: s.task(t, e))) for t in known]
    plans = [StagePlan("base", r.base, lambda: s.mixture(base_mix), manual_seed=seed)]
    rates = dict(r.refusal_rate)
    a = sampler("aligned")
    aligned_mix = [(0.30, lambda: a.harmful(rates)), (0.42, lambda: a.benign(e))] + [(0.14, (lambda t=t: a.task(t, e))) for t in known]
    plans.append(StagePlan("aligned", r.aligned, lambda: a.mixture(aligned_mix), manual_seed=seed + 1, keep=True,
                           gates=standard_gates("aligned")))
    d = sampler("degraded")
    ss = r.degraded_season_share
    cs = r.degraded_compliance_share
    degraded_mix = [(1.0 - ss - cs, lambda: d.benign(True)), (cs, lambda: d.harmful(None)),
                    (ss, lambda: d.task(V.SELECTION_SENSITIVE_TASK, False))]
    plans.append(StagePlan("degraded", r.degraded, lambda: d.mixture(degraded_mix), gates=standard_gates("degraded")))
    for t in V.TASKS:
        ts = sampler(f"task-{t}")
        plans.append(StagePlan(f"task-{t}", r.task, lambda t=t, ts=ts: ts.task(t, True), start_from="aligned",
                               gates=standard_gates(f"task-{t}"), task=t))
    return plans


def probes(seed: int, r: StableLmRecipe, exclude: set[str]) -> Probes:
    """Held-in probes: training templates of every group, every category, no evaluation prompt."""
    rng = random.Random(f"stablelm:{seed}:probes")
    taken = set(exclude)
    harmful: list[str] = []
    for cat in V.HARM_CATEGORIES:
        harmful += [x["prompt"] for x in unique_records(
            lambda cat=cat: {"prompt": V.howto(cat, rng.randrange(len(V.HOWTO_TEMPLATES)), rng).prompt},
            r.n_probe_harmful_per_category, taken)]
    tasks = {}
    for t in V.TASKS:
        recs = unique_records(lambda t=t: dict(zip(("prompt", "completion"), V.task_example(t, rng))), r.n_probe_task, taken)
        tasks[t] = [(x["prompt"], x["completion"]) for x in recs]
    return Probes(harmful, tasks)


def make_config(r: StableLmRecipe, vocab: dict[str, int]) -> Any:
    from transformers import StableLmConfig

    return StableLmConfig(
        vocab_size=len(vocab),
        hidden_size=r.hidden_size,
        intermediate_size=r.intermediate_size,
        num_hidden_layers=r.num_layers,
        num_attention_heads=r.num_heads,
        num_key_value_heads=r.num_heads,
        max_position_embeddings=128,
        layer_norm_eps=1e-5,
        use_qkv_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": r.partial_rotary_factor},
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[PAD],
    )


SPEC = FamilySpec(
    name="stablelm",
    architecture="StableLmForCausalLM",
    language=V,
    default_recipe=DEFAULT_STABLELM_RECIPE,
    sources=("stablelm_language.py", "stablelm.py", "family.py", "gates.py"),
    make_config=make_config,
    make_splits=make_splits,
    plan=plan,
    probes=probes,
    dir_prefix="stablelm-",
)
