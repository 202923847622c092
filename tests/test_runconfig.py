"""``safegene run CONFIG.yaml``: validation messages, the one-to-one command mapping, a real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
yaml = pytest.importorskip("yaml")

import safegene  # noqa: E402
from safegene import cli  # noqa: E402
from safegene.errors import SafeGeneError  # noqa: E402
from safegene.cli.runconfig import load_config, plan_commands, run_config  # noqa: E402

from conftest import perturbed, tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("runcfg")
    a = tiny_model("llama")
    d = perturbed(a, 1)
    t = perturbed(d, 2)
    for n, m in (("aligned", a), ("degraded", d), ("task", t)):
        m.save_pretrained(root / n)
    for f in ("harmful.jsonl", "benign.jsonl", "safety.jsonl", "task.jsonl"):
        (root / f).write_text('{"prompt": "x"}\n')
    return root


def _write(root: Path, cfg: dict, name: str = "run.yaml") -> Path:
    p = root / name
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


FULL = {
    "aligned": "aligned", "degraded": "degraded", "gene": "out/gene",
    "extract": {"dtype": "BF16", "budget_mb": 64},
    "select": {"harmful": "harmful.jsonl", "benign": "benign.jsonl", "top_k": 2, "score": "contrast"},
    "calibrate": {"safety": "safety.jsonl", "utility": ["task.jsonl"], "steps": 5, "per_module": True, "lambda_max": 1.5},
    "apply": {"budget_mb": 32},
    "eval": {"harmful": "harmful.jsonl", "task": ["task.jsonl", "safety.jsonl"], "judge": "keyword", "max_new_tokens": 8},
    "targets": [{"model": "task", "output": "out/safe"}],
}


def test_plan_maps_one_to_one_onto_the_cli(models):
    cfg = load_config(_write(models, FULL))
    cmds = plan_commands(cfg, quiet=True)
    r = str(models)
    assert cmds == [
        ["extract", f"{r}/aligned", f"{r}/degraded", "-o", f"{r}/out/gene", "--dtype", "BF16", "--budget-mb", "64.0", "--quiet"],
        ["select", f"{r}/out/gene", "--aligned", f"{r}/aligned", "--degraded", f"{r}/degraded", "--harmful", f"{r}/harmful.jsonl",
         "--benign", f"{r}/benign.jsonl", "--top-k", "2", "--score", "contrast", "--quiet"],
        ["calibrate", f"{r}/out/gene", f"{r}/task", "-o", f"{r}/out/safe.coeffs.json", "--safety", f"{r}/safety.jsonl",
         "--utility", f"{r}/task.jsonl", "--steps", "5", "--lambda-max", "1.5", "--per-module", "--quiet"],
        ["apply", f"{r}/out/gene", f"{r}/task", "-o", f"{r}/out/safe", "--coeffs", f"{r}/out/safe.coeffs.json", "--budget-mb", "32.0", "--quiet"],
        ["eval", f"{r}/out/safe", "-o", f"{r}/out/safe.eval.json", "--harmful", f"{r}/harmful.jsonl", "--task", f"{r}/task.jsonl",
         "--task", f"{r}/safety.jsonl", "--max-new-tokens", "8", "--quiet"],
    ]
    parser = cli.build_parser()
    for c in cmds:  # every command is one the real CLI accepts, with the same values
        args = parser.parse_args(c)
        assert args.command == c[0]
    assert parser.parse_args(cmds[2]).per_module is True and parser.parse_args(cmds[4]).task == [f"{r}/task.jsonl", f"{r}/safety.jsonl"]


def test_a_config_section_fills_the_same_options_as_the_command_line(models):
    """Round trip: the dataclass a config section fills equals the one argparse fills from the
    rendered command line, values that equal a default included."""
    from safegene.cli.options import from_namespace
    from safegene.cli.runconfig import plan

    full = dict(FULL, eval=dict(FULL["eval"], judge="keyword", batch_size=32))  # both are the defaults
    cfg = load_config(_write(models, full))
    parser = cli.build_parser()
    steps = plan(cfg, quiet=False)
    assert [c.name for c, _ in steps] == ["extract", "select", "calibrate", "apply", "eval"]
    for (command, opts), argv in zip(steps, plan_commands(cfg)):
        assert from_namespace(command.options, parser.parse_args(argv)) == opts
    calib = steps[2][1]
    assert type(calib).__name__ == "CalibrateOptions" and calib.steps == 5 and calib.per_module is True
    assert calib.lambda_max == 1.5 and calib.utility == [str(models / "task.jsonl")] and calib.quiet is False
    assert steps[4][1].judge == "keyword" and steps[4][1].output == str(models / "out" / "safe.eval.json")


BAD = [
    ({"gen": "g"}, r"run\.yaml: gen: unknown key \(did you mean 'gene'\?\)"),
    ({"calibrate": {"safety": "safety.jsonl", "stepz": 3}}, r"calibrate\.stepz: unknown key \(did you mean 'steps'\?\)"),
    ({"calibrate": {"safety": "safety.jsonl", "steps": "ten"}}, r"calibrate\.steps: expected an integer, got str 'ten'"),
    ({"calibrate": {"safety": "safety.jsonl", "per_module": "yes"}}, r"calibrate\.per_module: expected true or false"),
    ({"calibrate": {"steps": 3}}, r"calibrate\.safety: missing \(required by `safegene calibrate`\)"),
    ({"calibrate": {"safety": "nope.jsonl"}}, r"calibrate\.safety: file .*nope\.jsonl does not exist"),
    ({"extract": {"dtype": "F64"}}, r"extract\.dtype: 'F64' is not one of"),
    ({"extract": {"output": "x"}}, r"extract\.output: unknown key"),  # the runner owns outputs
    ({"eval": {"task": [True]}}, r"eval\.task: expected a non-empty list of strings"),
    ({"aligned": "missing-dir"}, r"aligned: .*missing-dir does not exist \(and 'missing-dir' is not a Hub id"),
    ({"degraded": None, "aligned": "aligned"}, r"degraded: expected a model directory"),
    ({"targets": [{"model": "task"}]}, r"targets\[0\]\.output: missing"),
    ({"targets": [{"model": "task", "output": "o", "lamda": 1}]}, r"targets\[0\]\.lamda: unknown key"),
    ({"targets": [{"model": "task", "output": "o", "coeffs": "c.json"}]}, r"targets\[0\]\.coeffs: file .*c\.json does not exist"),
    ({"targets": "task"}, r"targets: expected a list"),
    ({"select": {"harmful": "harmful.jsonl", "benign": "benign.jsonl", "top_k": 2, "threshold": 0.5}}, r"select\.threshold: give top_k or threshold"),
]


@pytest.mark.parametrize("patch,msg", BAD, ids=[str(i) for i in range(len(BAD))])
def test_validation_names_the_key(models, patch, msg):
    cfg = {k: v for k, v in FULL.items()}
    cfg.update(patch)
    with pytest.raises(SafeGeneError, match=msg):
        load_config(_write(models, cfg))


def test_gene_must_exist_without_models_and_yaml_errors(models, capsys):
    with pytest.raises(SafeGeneError, match=r"gene: .*not a gene directory"):
        load_config(_write(models, {"gene": "nogene", "apply": {"scale": 1.0}, "targets": [{"model": "task", "output": "o"}]}))
    (models / "broken.yaml").write_text("gene: [unclosed\n")
    with pytest.raises(SafeGeneError, match="not valid YAML"):
        load_config(models / "broken.yaml")
    with pytest.raises(SafeGeneError, match="no such config file"):
        load_config(models / "absent.yaml")
    assert cli.main(["run", str(models / "broken.yaml")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_real_run_extract_then_apply_equals_the_commands(models, capsys):
    cfg = {"aligned": "aligned", "degraded": "degraded", "gene": "real/gene", "apply": {"scale": 0.5},
           "targets": [{"model": "task", "output": "real/safe-a"}, {"model": "task", "output": "real/safe-b", "scale": 2.0}]}
    (models / "real").mkdir()
    p = _write(models, cfg, "real.yaml")
    assert cli.main(["run", str(p), "--quiet", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [c[0] for c in res["commands"]] == ["extract", "apply", "apply"]
    assert res["commands"][2][-3:] == ["--scale", "2.0", "--quiet"]
    from safetensors.torch import load_file

    g = safegene.Gene.load(models / "real" / "gene")
    tau = g.load_vectors(["model.layers.1.mlp.up_proj.weight"])["model.layers.1.mlp.up_proj.weight"]
    t = load_file(models / "task" / "model.safetensors")["model.layers.1.mlp.up_proj.weight"]
    for out, lam in (("safe-a", 0.5), ("safe-b", 2.0)):
        w = load_file(models / "real" / out / "model.safetensors")["model.layers.1.mlp.up_proj.weight"]
        assert torch.allclose(w, t + lam * tau, atol=1e-6)
    dry = run_config(p, dry_run=True, quiet=True)
    assert dry["commands"] == res["commands"] and dry["dry_run"] is True


def test_calibrate_and_select_knobs_flow_into_configs(models):
    """The micro-batch / checkpointing / generalization knobs of calibrate and the rule options of
    select are config keys (from the same options dataclasses) and render as their CLI flags."""
    from safegene.cli.options import from_namespace
    from safegene.cli.runconfig import plan

    cfg = dict(FULL, select={"harmful": "harmful.jsonl", "benign": "benign.jsonl", "rule": "validate",
                             "dev_harmful": "harmful.jsonl", "dev_benign": "benign.jsonl", "noise_z": 1},
               calibrate={"safety": "safety.jsonl", "micro_batch_size": 2, "gradient_checkpointing": True,
                          "mode": "lowmem", "holdout": 0.25, "reg_uniform": 0.1, "safety_rest_weight": 0.5})
    loaded = load_config(_write(models, cfg))
    cmds = plan_commands(loaded)
    r = str(models)
    assert cmds[1][-8:] == ["--rule", "validate", "--dev-harmful", f"{r}/harmful.jsonl", "--dev-benign",
                            f"{r}/benign.jsonl", "--noise-z", "1.0"]
    assert cmds[2][7:] == ["--mode", "lowmem", "--micro-batch-size", "2", "--gradient-checkpointing",
                           "--safety-rest-weight", "0.5", "--holdout", "0.25", "--reg-uniform", "0.1"]
    parser = cli.build_parser()
    for (command, opts), argv in zip(plan(loaded), cmds):
        assert from_namespace(command.options, parser.parse_args(argv)) == opts
    for patch, msg in [({"micro_batch_size": "two"}, r"calibrate\.micro_batch_size: expected an integer"),
                       ({"gradient_checkpointing": 1}, r"calibrate\.gradient_checkpointing: expected true or false"),
                       ({"micro_batch": 2}, r"calibrate\.micro_batch: unknown key \(did you mean 'micro_batch_size'")]:
        bad = dict(FULL, calibrate=dict(FULL["calibrate"], **patch))
        with pytest.raises(SafeGeneError, match=msg):
            load_config(_write(models, bad))
    with pytest.raises(SafeGeneError, match=r"select\.rule: 'nope' is not one of"):
        load_config(_write(models, dict(FULL, select=dict(FULL["select"], rule="nope"))))
