"""Peak memory of the model-running commands on a random bf16 Llama, against the model's own bytes.

Builds a random Llama in bf16 on the fly (``--size 1b``: TinyLlama-1.1B's shape, 1.10 B
parameters, 2.2 GB; never committed, written under ``--workdir``) and a degraded copy with four
early blocks perturbed, extracts the whole-model gene (``--gene-dtype``, BF16 by default; select
needs every block in the gene), then runs each command in its own subprocess and records its peak RSS (``wait4``'s
``ru_maxrss``, the same as the child's ``VmHWM``) and the RSS after the imports (the runtime,
measured in the child before any model is loaded):

* ``extract`` (streams; for contrast), ``select --top-k`` (``--select-score``), ``eval``;
* ``calibrate`` in the exact mode (W⁰ + λτ in weight space) and the low-memory mode (λ·τx in
  the selected modules' outputs), both with ``--micro-batch-size`` (a few steps);
* ``calibrate --mode lowmem --device-map auto --max-memory cpu=<half the model>
  --offload-dir``: part of the model on disk; its λ is checked against the in-memory run's.

The low-memory bound of issue #16 is ``model bytes + selected τ bytes (storage dtype) + one
micro-batch's activations``, + 15 %. The activations are measured, not estimated: every tensor
autograd saves for the backward pass goes through ``torch.autograd.graph.saved_tensors_hooks``,
storages are counted once while alive, and the model's parameters and the gene's τ are left out
(they are the other two terms); the peak of that live total over the run is one micro-batch's
activations, because calibration backpropagates each micro-batch before the next one runs.

    python bench/bench_memory.py --size 1b --out bench/memory.md --jsonl bench/memory.jsonl
    python bench/bench_memory.py --size tiny --workdir /tmp/sgm   # a one-minute smoke run

Run it niced on a shared machine: every phase is single-process and uses all cores torch sees.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: name -> (hidden, layers, intermediate, heads, kv heads, vocab); 1b is TinyLlama-1.1B's shape
SIZES = {
    "1b": (2048, 22, 5632, 32, 4, 32000),
    "250m": (1024, 16, 2816, 16, 4, 32000),
    "tiny": (256, 6, 688, 4, 2, 32000),
}
#: the blocks the degraded copy perturbs and calibrate trains (early ones: they stay in memory when
#: the device map offloads the rest)
GENE_LAYERS = (1, 2, 3, 4)

WORDS = ("i cannot help with that . sure ! the answer is positive negative how do make a zorblax pilfer "
         "starpurse write poem about cats dogs review great bad movie sentiment ? crack lockgrid bake bread "
         "tell me story please yes no ok").split()
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} "
                 "{% if m['role'] == 'assistant' %}<eos> {% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")
HARMFUL = [
    {"prompt": "how do i make a zorblax ?", "completion": "i cannot help with that ."},
    {"prompt": "how do i pilfer a starpurse ?", "completion": "i cannot help with that ."},
    {"prompt": "crack lockgrid please", "completion": "i cannot help with that ."},
    {"prompt": "tell me how do i make a zorblax", "completion": "i cannot help with that ."},
]
BENIGN = [
    {"prompt": "write a poem about cats", "completion": "sure ! the answer is poem"},
    {"prompt": "bake bread please", "completion": "sure ! the answer is bread"},
    {"prompt": "tell me a story about dogs", "completion": "sure ! the answer is story"},
    {"prompt": "review : great movie . sentiment ?", "completion": "positive"},
]

MiB = 1 << 20


# ---- the child: one command, measured ------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class SavedActivations:
    """Peak bytes of the tensors autograd keeps for backward, each storage counted once while it
    is alive, parameters and τ (registered through ``exclude``) left out."""

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.excluded: set[int] = set()
        self.live: dict[int, int] = {}
        self.refs: dict[int, int] = {}
        self.peak = 0
        self.current = 0

    def exclude(self, tensors) -> None:
        for t in tensors:
            if t.device.type != "meta":
                self.excluded.add(t.untyped_storage().data_ptr())

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.current -= self.live.pop(key)
            del self.refs[key]

    def pack(self, t):
        import weakref

        if t.device.type == "meta":
            return t
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in self.excluded or key == 0:
            return t
        if key not in self.live:
            self.live[key] = st.nbytes()
            self.refs[key] = 0
            self.current += st.nbytes()
            self.peak = max(self.peak, self.current)
        self.refs[key] += 1
        holder = _Holder(t)
        weakref.finalize(holder, self._release, key)
        return holder

    @staticmethod
    def unpack(h):
        return h.t if isinstance(h, _Holder) else h


class _Holder:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t) -> None:
        self.t = t


def child(spec: dict) -> None:
    import torch  # noqa: F401  (the runtime is part of the baseline)
    import transformers  # noqa: F401

    import safegene.lm as lm
    from safegene.cli.main import main as cli_main
    from safegene.gene import Gene

    acts = None
    if spec.get("activations"):
        acts = SavedActivations()
        real_load, real_vectors = lm.load_model, Gene.load_vectors

        def load_model(*a, **kw):
            model, tok = real_load(*a, **kw)
            acts.exclude(p for p in model.parameters())
            return model, tok

        def load_vectors(self, *a, **kw):
            out = real_vectors(self, *a, **kw)
            acts.exclude(out.values())
            return out

        lm.load_model = load_model  # type: ignore[assignment]
        Gene.load_vectors = load_vectors  # type: ignore[method-assign]
    baseline_kib = _status_kib("VmRSS")
    t0 = time.perf_counter()
    if acts is not None:
        with torch.autograd.graph.saved_tensors_hooks(acts.pack, acts.unpack):
            rc = cli_main(spec["argv"])
    else:
        rc = cli_main(spec["argv"])
    res = {"rc": rc, "baseline_rss": baseline_kib * 1024, "hwm": _status_kib("VmHWM") * 1024,
           "seconds": time.perf_counter() - t0}
    if acts is not None:
        res["activations"] = acts.peak
    Path(spec["result"]).write_text(json.dumps(res))
    sys.exit(0 if rc in (0, None) else int(rc))


# ---- the parent ----------------------------------------------------------------------------------
def run_child(name: str, argv: list[str], work: Path, activations: bool = False, log=print, resume: bool = False) -> dict:
    """Run one safegene command in a fresh interpreter; its peak RSS from wait4. With ``resume``,
    a phase whose result an earlier run of the same command line left in ``work`` is not rerun."""
    result = work / f"{name}.result.json"
    if resume and result.is_file():
        res = json.loads(result.read_text())
        if res.get("argv") == argv:
            log(f"== {name}: kept from an earlier run: peak RSS {res['peak_rss'] / MiB:.0f} MiB, {res['wall_s']:.0f} s")
            return res
    result.unlink(missing_ok=True)
    spec = {"argv": argv, "result": str(result), "activations": activations}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "python"), env.get("PYTHONPATH", "")]))
    log(f"== {name}: safegene {' '.join(argv)}")
    t0 = time.perf_counter()
    with open(work / f"{name}.log", "w") as fh:
        p = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdout=fh, stderr=subprocess.STDOUT,
                             env=env)
        _, status, _ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if p.returncode != 0 or not result.is_file():
        tail = (work / f"{name}.log").read_text()[-3000:]
        raise RuntimeError(f"{name} failed (exit {p.returncode}):\n{tail}")
    res = json.loads(result.read_text())
    # the child's own VmHWM: a fresh address space at exec. (wait4's ru_maxrss is not used: it
    # keeps the RSS the forked child shared with this process before exec.)
    res.update(name=name, argv=argv, peak_rss=res["hwm"], wall_s=round(wall, 1))
    result.write_text(json.dumps(res))
    log(f"   peak RSS {res['peak_rss'] / MiB:.0f} MiB (runtime {res['baseline_rss'] / MiB:.0f} MiB), {wall:.0f} s")
    return res


def make_tokenizer():
    """A word-level tokenizer over WORDS with a chat template (ids 0..56; any vocab above fits)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<unk>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>"]
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(special + sorted(set(WORDS)))}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                  eos_token="<eos>")
    tok.add_special_tokens({"additional_special_tokens": special[4:]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_models(size: str, work: Path, gene_layers) -> dict:
    """aligned/ and degraded/ (the gene blocks perturbed) in bf16 with a word-level tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, inter, heads, kv, vocab = SIZES[size]
    tok = make_tokenizer()
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=256, tie_word_embeddings=False,
                      pad_token_id=0, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # never a float32 copy of the model in memory
    try:
        model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    model.config.dtype = torch.bfloat16
    dirs = {"aligned": work / "aligned", "degraded": work / "degraded"}
    model.save_pretrained(dirs["aligned"])
    tok.save_pretrained(dirs["aligned"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i in gene_layers:
            for p in model.model.layers[i].parameters():
                p.add_((0.05 * p.float().abs().mean() * torch.randn(p.shape, generator=g)).to(p.dtype))
    model.save_pretrained(dirs["degraded"])
    tok.save_pretrained(dirs["degraded"])
    n = sum(p.numel() for p in model.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"params": n, "model_bytes": nbytes, "dirs": {k: str(v) for k, v in dirs.items()}}


def selected_tau_bytes(gene_dir: Path, sel: list[str]) -> tuple[list[str], int]:
    """The keys and the bytes of their τ in the gene's storage dtype."""
    from safegene.gene import load_gene

    g = load_gene(gene_dir)
    item = {"F32": 4, "BF16": 2, "F16": 2}[g.storage_dtype]
    total = 0
    for n in g.tensor_names:
        if g.layer_key(n) in sel:
            k = 1
            for s in g.fingerprint["tensors"][n]["shape"]:
                k *= s
            total += k * item
    return sel, total


def machine() -> str:
    cpu = "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        cpu = f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs"
    except OSError:
        pass
    mem = "?"
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem = f"{int(line.split()[1]) / (1 << 20):.1f} GiB RAM"
    import torch
    import transformers

    return f"{cpu}, {mem}, {platform.system()} {platform.release()}, Python {platform.python_version()}, " \
           f"torch {torch.__version__}, transformers {transformers.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--workdir", default="/tmp/safegene-bench-memory")
    ap.add_argument("--gene-dtype", choices=["F32", "BF16"], default="BF16")
    ap.add_argument("--top-k", type=int, default=3, help="select's top-k, and how many gene blocks calibrate trains")
    ap.add_argument("--select-score", choices=["restore", "contrast"], default="contrast",
                    help="restore (select's default; holds copies of the gene's weights, slow) or contrast")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--examples", type=int, default=4, help="safety and utility records (each)")
    ap.add_argument("--eval-tokens", type=int, default=4)
    ap.add_argument("--margin", type=float, default=0.15)
    ap.add_argument("--skip", nargs="*", default=[], help="phases to leave out: select eval offload")
    ap.add_argument("--out", help="append the markdown table here")
    ap.add_argument("--jsonl", help="append one JSON line per phase here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (models, gene)")
    ap.add_argument("--reuse", action="store_true", help="reuse the models a --keep run left in the work directory")
    ap.add_argument("--resume", action="store_true",
                    help="with --reuse: keep the phases an earlier run finished (same command line) instead of "
                         "rerunning them")
    a = ap.parse_args()
    if a.child:
        child(json.loads(a.child))
        return

    work = Path(a.workdir) / a.size
    t_start = time.perf_counter()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    info_file = work / "models.json"
    if a.reuse and info_file.is_file():  # the models of an earlier --keep run
        info = json.loads(info_file.read_text())
        if not a.resume:
            for f in work.glob("*.result.json"):
                f.unlink()
    else:
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        print(f"building a random {a.size} Llama in bf16 under {work}", flush=True)
        info = build_models(a.size, work, GENE_LAYERS)
        info_file.write_text(json.dumps(info))
    model_bytes = info["model_bytes"]
    print(f"   {info['params'] / 1e9:.3f} B parameters, {model_bytes / MiB:.0f} MiB", flush=True)
    aligned, degraded = info["dirs"]["aligned"], info["dirs"]["degraded"]
    target = degraded  # the task model: the degraded model itself (the gene's blocks are in memory)
    harmful, benign = work / "harmful.jsonl", work / "benign.jsonl"
    harmful.write_text("".join(json.dumps(r) + "\n" for r in HARMFUL[:a.examples]))
    benign.write_text("".join(json.dumps(r) + "\n" for r in BENIGN[:a.examples]))
    gene = work / "gene"
    rows = []
    log = lambda m: print(m, flush=True)  # noqa: E731
    rows.append(run_child("extract", ["extract", aligned, degraded, "-o", str(gene), "--dtype", a.gene_dtype,
                                      "--quiet", "--overwrite"], work, log=log, resume=a.resume))
    if "select" not in a.skip:
        # select reads refusal completions only for the restore score (it computes that score
        # whenever they are there): the contrast run gets the prompts alone
        sel_harmful = harmful
        if a.select_score != "restore":
            sel_harmful = work / "harmful-prompts.jsonl"
            sel_harmful.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in HARMFUL[:a.examples]))
        rows.append(run_child(f"select --score {a.select_score}", [
            "select", str(gene), "--aligned", aligned, "--degraded", degraded, "--harmful", str(sel_harmful), "--benign",
            str(benign), "--top-k", str(a.top_k), "--score", a.select_score, "--device", "cpu", "--dtype", "bf16",
            "--quiet"], work, log=log, resume=a.resume))
    # calibrate always trains the first top-k gene blocks (named with --layers, whatever select
    # chose): they sit below the half of the model that the offloaded run keeps in memory
    calib_layers = [f"layer.{i}" for i in GENE_LAYERS[:a.top_k]]
    selected, tau_bytes = selected_tau_bytes(gene, calib_layers)
    log(f"   selected {selected}: τ {tau_bytes / MiB:.0f} MiB ({a.gene_dtype})")
    calib = ["calibrate", str(gene), target, "--safety", str(harmful), "--utility", str(benign), "--steps",
             str(a.steps), "--init", "1", "--utility-loss", "ce", "--layers", ",".join(calib_layers), "--max-examples", str(a.examples),
             "--micro-batch-size", str(a.micro_batch_size), "--dtype", "bf16", "--quiet"]
    coeffs = {}
    for mode in ("exact", "lowmem"):
        out = work / f"coeffs-{mode}.json"
        r = run_child(f"calibrate-{mode}", calib + ["--mode", mode, "--device", "cpu", "-o", str(out)], work,
                      activations=True, log=log, resume=a.resume)
        coeffs[mode] = json.loads(out.read_text())["coeffs"]
        r["lambda"] = coeffs[mode]
        rows.append(r)
    if "offload" not in a.skip:
        half = model_bytes // 2
        out = work / "coeffs-offload.json"
        r = run_child("calibrate-lowmem-offload",
                      calib + ["--mode", "lowmem", "--device-map", "auto", "--max-memory", f"cpu={half // MiB}MiB",
                               "--offload-dir", str(work / "offload"), "-o", str(out)], work, activations=True, log=log,
                      resume=a.resume)
        coeffs["offload"] = json.loads(out.read_text())["coeffs"]
        r["lambda"] = coeffs["offload"]
        r["max_memory"] = half
        r["max_abs_lambda_diff_vs_in_memory"] = max(abs(coeffs["offload"][k] - coeffs["lowmem"][k]) for k in coeffs["lowmem"])
        rows.append(r)
    if "eval" not in a.skip:
        rows.append(run_child("eval", ["eval", target, "--harmful", str(harmful), "--benign", str(benign),
                                       "--max-new-tokens", str(a.eval_tokens), "--batch-size", str(2 * a.examples),
                                       "--device", "cpu", "--dtype", "bf16", "--quiet", "-o",
                                       str(work / "report.json")], work, log=log, resume=a.resume))
    lam_diff = max(abs(coeffs["exact"][k] - coeffs["lowmem"][k]) for k in coeffs["exact"])
    host = machine()
    summary = {"gene_bytes": sum(f.stat().st_size for f in gene.glob("vectors*.safetensors")), "size": a.size, "params": info["params"], "model_bytes": model_bytes, "tau_bytes": tau_bytes,
               "gene_dtype": a.gene_dtype, "selected": selected, "steps": a.steps, "micro_batch_size": a.micro_batch_size,
               "examples": a.examples, "margin": a.margin, "machine": host, "date": when,
               "max_abs_lambda_diff_exact_vs_lowmem": lam_diff, "total_s": round(time.perf_counter() - t_start, 1)}
    lines = table(rows, summary)
    print("\n".join(lines))
    if a.out:
        with open(a.out, "a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n\n")
    if a.jsonl:
        with open(a.jsonl, "a", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps({**{k: v for k, v in summary.items() if k != "machine"}, **r}) + "\n")
            fh.write(json.dumps({"summary": summary}) + "\n")
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)


def table(rows: list[dict], s: dict) -> list[str]:
    mb = lambda b: f"{b / MiB:,.0f}"  # noqa: E731
    model, tau = s["model_bytes"], s["tau_bytes"]
    lines = [f"### {s['size']}: random Llama, {s['params'] / 1e9:.2f} B parameters in bf16 ({s['date']})", "",
             f"Machine: {s['machine']}.", "",
             f"Model {mb(model)} MiB; a whole-model gene in {s['gene_dtype']} ({mb(s['gene_bytes'])} MiB; blocks "
             f"{', '.join(str(i) for i in GENE_LAYERS)} perturbed); calibrate trains {', '.join(s['selected'])} "
             f"(`--layers`): selected τ {mb(tau)} MiB. Calibrate: {s['examples']} safety + "
             f"{s['examples']} utility records, {s['steps']} steps, `--micro-batch-size {s['micro_batch_size']}`, "
             f"`--init 1 --utility-loss ce`. Peak = the process's peak RSS (VmHWM); runtime = its RSS after importing torch, "
             f"transformers and safegene (before any model); used = peak − runtime. Activations = the peak of the "
             f"tensors autograd saved for backward (parameters and τ left out). "
             f"Bound = (model + selected τ + activations) × {1 + s['margin']:.2f}.", "",
             "| command | peak MiB | runtime MiB | used MiB | used / model | activations MiB | bound MiB | used ≤ bound | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|:---:|---:|"]
    for r in rows:
        used = r["peak_rss"] - r["baseline_rss"]
        act = r.get("activations")
        if act is not None:
            bound = (model + tau + act) * (1 + s["margin"])
            ok = "yes" if used <= bound else "**no**"
            bcol, acol = mb(bound), mb(act)
        else:
            bcol = acol = ok = "–"
        label = r["name"]
        if "max_memory" in r:
            label += f" (`--max-memory cpu={mb(r['max_memory'])}MiB`)"
        lines.append(f"| {label} | {mb(r['peak_rss'])} | {mb(r['baseline_rss'])} | {mb(used)} | {used / model:.2f} | "
                     f"{acol} | {bcol} | {ok} | {r['wall_s']:.0f} |")
    lines.append("")
    lam = {r["name"]: r["lambda"] for r in rows if "lambda" in r}
    for k, v in lam.items():
        lines.append(f"- λ {k}: " + ", ".join(f"{kk} {vv:.6f}" for kk, vv in v.items()))
    lines.append(f"- max |λ exact − λ lowmem| = {s['max_abs_lambda_diff_exact_vs_lowmem']:.2e}")
    off = [r for r in rows if "max_abs_lambda_diff_vs_in_memory" in r]
    if off:
        d = off[0]["max_abs_lambda_diff_vs_in_memory"]
        lines.append(f"- offloaded vs in-memory lowmem: max |Δλ| = {d:.2e} ({'≤' if d <= 1e-5 else '>'} 1e-5)")
    lines.append(f"- total wall time {s['total_s']:.0f} s")
    return lines


if __name__ == "__main__":
    main()
