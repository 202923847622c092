"""Running models at scale: the loading knobs (dtype, device, accelerate device maps), batches on
the model's own device, the kernels' torch twins (bit for bit against the kernels on CPU), one
kernel call per device, and a tied head stored twice in the checkpoint."""

from __future__ import annotations

import itertools
import json

import pytest

torch = pytest.importorskip("torch")

import safegene  # noqa: E402
from safegene import lm  # noqa: E402
from safegene.engine import native  # noqa: E402
from safegene.errors import GeneError, SafeGeneError, UsageError  # noqa: E402
from safegene.gene import Gene  # noqa: E402
from safegene.method import merge  # noqa: E402
from safegene.method.calibrate import calibrate  # noqa: E402
from safegene.method.merge import MergePlan  # noqa: E402

import tiny_models as tm  # noqa: E402
from conftest import DEVICES  # noqa: E402

LAYERS = ["layer.2", "layer.3"]


@pytest.fixture(scope="module")
def family(gene_family):
    return gene_family


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids.to(lm.model_device(model))).logits.float().cpu()


IDS = torch.tensor([[2, 9, 10, 11, 12]])


# ---- loading knobs -----------------------------------------------------------------------------
@pytest.mark.parametrize("spec,want", [("auto", torch.float32), (None, torch.float32), ("bf16", torch.bfloat16),
                                       ("f16", torch.float16), ("f32", torch.float32)])
def test_load_model_dtype(family, spec, want):
    dirs, _ = family
    model, _ = lm.load_model(dirs["task"], device="cpu", dtype=spec)
    assert {p.dtype for p in model.parameters()} == {want}


def test_auto_dtype_keeps_the_checkpoints_own(family, tmp_path):
    dirs, _ = family
    m, tok = lm.load_model(dirs["task"], device="cpu", dtype="bf16")
    m.save_pretrained(tmp_path / "bf16")
    tok.save_pretrained(tmp_path / "bf16")
    again, _ = lm.load_model(tmp_path / "bf16", device="cpu")
    assert {p.dtype for p in again.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("version,key", [("4.46.3", "torch_dtype"), ("5.0.0", "dtype"), ("5.24.0", "dtype")])
def test_dtype_keyword_follows_the_transformers_major(monkeypatch, version, key):
    import transformers

    monkeypatch.setattr(transformers, "__version__", version)
    assert lm._dtype_kwarg("bf16") == {key: torch.bfloat16}
    assert lm._dtype_kwarg(None) == {key: "auto"}


def test_transformers_4_code_path_loads_the_dtype(family, monkeypatch):
    # transformers 5 still reads torch_dtype=, so the 4.x keyword is exercised for real here
    import transformers

    dirs, _ = family
    monkeypatch.setattr(transformers, "__version__", "4.46.3")
    model, _ = lm.load_model(dirs["task"], device="cpu", dtype="f16")
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_bad_dtype_and_memory_specs():
    with pytest.raises(UsageError, match="unknown dtype"):
        lm.resolve_dtype("int8")
    assert lm.parse_max_memory("0=20GiB, cpu=64GiB") == {0: "20GiB", "cpu": "64GiB"}
    assert lm.parse_max_memory('{"1": "10GiB", "cpu": "1GiB"}') == {1: "10GiB", "cpu": "1GiB"}
    with pytest.raises(UsageError, match="DEVICE=SIZE"):
        lm.parse_max_memory("20GiB")
    assert lm.parse_device_map('{"": "cpu"}') == {"": "cpu"}
    assert lm.parse_device_map("balanced") == "balanced"
    with pytest.raises(UsageError, match="not valid JSON"):
        lm.parse_device_map("{oops")
    with pytest.raises(UsageError, match="need a device_map"):
        lm.pretrained_kwargs(max_memory="cpu=1GiB")


@pytest.mark.parametrize("device_map", [{"": "cpu"}, "auto", '{"": "cpu"}'])
def test_device_map_loads_as_asked(family, device_map):
    dirs, _ = family
    ref, _ = lm.load_model(dirs["task"], device="cpu")
    model, _ = lm.load_model(dirs["task"], device_map=device_map)
    assert lm.model_device(model).type == "cpu"
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert torch.equal(_logits(model, IDS), _logits(ref, IDS))


def _disk_map(offloaded: set[int]) -> dict:
    m = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    m.update({f"model.layers.{i}": "disk" if i in offloaded else "cpu" for i in range(4)})
    return m


def test_disk_offload_runs_like_the_whole_model(family, tmp_path):
    dirs, _ = family
    ref, _ = lm.load_model(dirs["task"], device="cpu")
    model, _ = lm.load_model(dirs["task"], device_map=_disk_map({0, 1}), offload_dir=tmp_path / "off")
    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "meta"
    assert lm.model_device(model).type == "cpu"
    assert torch.equal(_logits(model, IDS), _logits(ref, IDS))


def test_cli_model_options_reach_the_api(monkeypatch, tmp_path):
    from safegene.cli import cmd_calibrate, cmd_eval, cmd_select
    from safegene.cli.options import specs, to_argv

    seen = {}
    monkeypatch.setattr(cmd_calibrate, "calibrate", lambda *a, **kw: seen.update(kw) or _Stub())
    argv = ["G/", "T/", "-o", str(tmp_path / "c.json"), "--safety", "s.jsonl", "--dtype", "bf16",
            "--device-map", "auto", "--max-memory", "0=1GiB,cpu=2GiB", "--offload-dir", "off/", "--quiet"]
    opts = cmd_calibrate.COMMAND.parse(argv)
    assert to_argv(cmd_calibrate.COMMAND, opts)[1:] == argv
    cmd_calibrate.handle_calibrate(opts)
    assert {k: seen[k] for k in ("device", "dtype", "device_map", "max_memory", "offload_dir")} == {
        "device": None, "dtype": "bf16", "device_map": "auto", "max_memory": "0=1GiB,cpu=2GiB", "offload_dir": "off/"}
    for cmd in (cmd_select.COMMAND, cmd_eval.COMMAND):
        names = {s.name for s in specs(cmd.options)}
        assert {"device", "dtype", "device_map", "max_memory", "offload_dir"} <= names


class _Stub:
    coeffs: dict = {}


# ---- batches follow the model --------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_calibrate_a_model_object_uses_its_device(family, monkeypatch, device):
    dirs, gene = family
    model, tok = lm.load_model(dirs["task"], device=device)
    seen = []
    real = lm.collate
    monkeypatch.setattr(lm, "collate", lambda pairs, pad, dev="cpu": seen.append(str(dev)) or real(pairs, pad, dev))
    c = calibrate(gene, model, tm.HARMFUL, tm.BENIGN, layers=LAYERS, tokenizer=tok, steps=2, init=1.0, log=None)
    assert seen and set(seen) == {str(lm.model_device(model))}
    assert set(c.coeffs) == set(LAYERS)


@pytest.mark.parametrize("mode", ["exact", "lowmem"])
def test_dispatched_model_calibrates_to_the_same_lambda(family, tmp_path, mode):
    dirs, gene = family
    kw = dict(layers=LAYERS, steps=4, init=1.0, lr=0.2, log=None, mode=mode)
    want = calibrate(gene, dirs["task"], tm.HARMFUL, tm.BENIGN, device="cpu", **kw).coeffs
    got = calibrate(gene, dirs["task"], tm.HARMFUL, tm.BENIGN, device_map={"": "cpu"}, **kw).coeffs
    assert got == want
    # blocks 0 and 1 offloaded to disk (not selected): the same λ
    disk = calibrate(gene, dirs["task"], tm.HARMFUL, tm.BENIGN, device_map=_disk_map({0, 1}),
                     offload_dir=tmp_path / "off", **kw).coeffs
    assert disk == pytest.approx(want, abs=1e-5)


def test_offloaded_selected_layer_is_refused_with_a_fix(family, tmp_path):
    from safegene.method.lowmem import LowMemPlan

    dirs, gene = family
    model, _ = lm.load_model(dirs["task"], device_map=_disk_map({2}), offload_dir=tmp_path / "off")
    for plan in (MergePlan, LowMemPlan):
        with pytest.raises(SafeGeneError, match="offloaded"):
            plan(model, gene, LAYERS)


# ---- torch twins of the kernels --------------------------------------------------------------------
DT = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
SIZES = [1, 5, 17, 1023, 1024, 1025, 65536 + 77, 2 * 65536 + 1000]


def _bits(t):
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


@pytest.mark.parametrize("dst,src", list(itertools.product(DT, DT)))
def test_torch_twins_match_the_kernels_bit_for_bit(dst, src):
    g = torch.Generator().manual_seed(0)
    dsts = [(3 * torch.randn(n, generator=g)).to(DT[dst]) for n in SIZES]
    srcs = [(torch.randn(n, generator=g) * 10.0 ** (k % 5 - 2)).to(DT[src]) for k, n in enumerate(SIZES)]
    coeffs = [0.1 * k - 0.37 for k in range(len(SIZES))]
    a, b = [d.clone() for d in dsts], [d.clone() for d in dsts]
    native.scale_add_(a, srcs, coeffs, backend="core")
    native.scale_add_(b, srcs, coeffs, backend="torch")
    for x, y in zip(a, b):
        assert torch.equal(_bits(x), _bits(y))
    # dot: the same blocked order as kernels.h, so the same double, not merely a close one
    assert native.dot(dsts, srcs, backend="torch") == native.dot(dsts, srcs, backend="core")


def test_torch_twin_overflow_and_nan():
    d = torch.tensor([1.0, float("nan"), 60000.0, -2.0, float("inf")], dtype=torch.float16)
    s = torch.tensor([1.0, 1.0, 60000.0, float("nan"), 1.0], dtype=torch.float32)
    a, b = d.clone(), d.clone()
    native.scale_add_([a], [s], [1.5], backend="core")
    native.scale_add_([b], [s], [1.5], backend="torch")
    finite = ~torch.isnan(a)
    assert torch.equal(torch.isnan(a), torch.isnan(b))  # NaN stays NaN (its sign bit may differ)
    assert torch.equal(_bits(a)[finite], _bits(b)[finite])


def test_env_var_forces_the_torch_twins(monkeypatch):
    calls = []
    monkeypatch.setattr(native, "_scale_add_torch", lambda *a: calls.append(a))
    monkeypatch.setenv(native.TORCH_ENV, "1")
    native.scale_add_([torch.zeros(3)], [torch.ones(3)], [1.0])
    assert len(calls) == 1
    monkeypatch.setenv(native.TORCH_ENV, "0")
    native.scale_add_([torch.zeros(3)], [torch.ones(3)], [1.0])
    assert len(calls) == 1
    with pytest.raises(SafeGeneError, match="unknown kernel backend"):
        native.scale_add_([torch.zeros(3)], [torch.ones(3)], [1.0], backend="fast")


def test_cuda_without_a_cuda_build_falls_back(monkeypatch):
    class NoCuda:
        @staticmethod
        def cuda_built():
            return False

    monkeypatch.setattr(native, "core", lambda: NoCuda)
    assert native._backend(torch.device("cuda", 0), None) == "torch"
    assert native._backend(torch.device("cuda", 0), "auto") == "torch"
    with pytest.raises(SafeGeneError, match="built without CUDA"):
        native._backend(torch.device("cuda", 0), "core")
    assert native._backend(torch.device("cpu"), None) == "core"


# ---- one kernel call per device ----------------------------------------------------------------------
def test_group_by_device_keeps_order_and_refuses_split_pairs():
    cpu, meta = torch.empty(2), torch.empty(2, device="meta")
    groups = native.group_by_device([cpu, meta, cpu, meta], [cpu, meta, cpu, meta], "x")
    assert list(groups.values()) == [[0, 2], [1, 3]]
    assert [d.type for d in groups] == ["cpu", "meta"]
    with pytest.raises(SafeGeneError, match="pair 1 has its tensors on"):
        native.group_by_device([cpu, cpu], [cpu, meta], "x")


def test_one_batched_call_per_device(monkeypatch):
    # two fake devices on one CPU: each group is one kernel call, results land in input order
    g = torch.Generator().manual_seed(1)
    dsts = [torch.randn(n, generator=g) for n in (7, 3000, 5, 70000)]
    srcs = [torch.randn(n, generator=g).to(torch.bfloat16) for n in (7, 3000, 5, 70000)]
    coeffs = [0.5, -1.25, 2.0, 0.75]
    want_d = [d.clone() for d in dsts]
    native.scale_add_(want_d, srcs, coeffs)
    want_dot = native.dot(dsts, srcs)

    fake = {torch.device("cpu"): [0, 2], torch.device("cpu", 0): [1, 3]}
    monkeypatch.setattr(native, "group_by_device", lambda a, b, what: fake)
    real = native.core()
    calls = []

    class Spy:
        DType = real.DType

        @staticmethod
        def cuda_built():
            return real.cuda_built()

        @staticmethod
        def scale_add(*a):
            calls.append(("scale_add", len(a[0])))
            return real.scale_add(*a)

        @staticmethod
        def dot(*a):
            calls.append(("dot", len(a[0])))
            return real.dot(*a)

    monkeypatch.setattr(native, "core", lambda: Spy)
    got_d = [d.clone() for d in dsts]
    native.scale_add_(got_d, srcs, coeffs)
    got_dot = native.dot(dsts, srcs)
    assert calls == [("scale_add", 2), ("scale_add", 2), ("dot", 2), ("dot", 2)]
    assert all(torch.equal(x, y) for x, y in zip(got_d, want_d))
    assert got_dot == want_dot


def test_taus_load_onto_each_weights_device(family, monkeypatch):
    _, gene = family
    seen = []
    real = Gene.load_vectors

    def spy(self, names=None, device="cpu", dtype=None):
        seen.append((list(names), device))
        return real(self, names, device="cpu", dtype=dtype)

    monkeypatch.setattr(Gene, "load_vectors", spy)

    class W:
        def __init__(self, dev):
            self.device = torch.device(dev)

    names = gene.tensor_names[:3]
    out = merge._load_per_device(gene, names, [W("cpu"), W("cpu:0"), W("cpu")])
    assert seen == [([names[0], names[2]], "cpu"), ([names[1]], "cpu:0")]
    assert list(out) == [names[0], names[2], names[1]]


# ---- a tied head stored twice ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """aligned / degraded / task checkpoints of a tied Llama whose files store lm_head too."""
    import copy

    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tied")
    tok = tm.make_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    aligned = LlamaForCausalLM(cfg).eval()
    degraded = tm.perturb(copy.deepcopy(aligned), 1, 0.3)
    task = tm.perturb(copy.deepcopy(degraded), 2, 0.2)
    dirs = {}
    for name, m in (("aligned", aligned), ("degraded", degraded), ("task", task)):
        d = root / name
        m.config.save_pretrained(d)
        tok.save_pretrained(d)
        sd = {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        dirs[name] = d
    g = safegene.extract(dirs["aligned"], dirs["degraded"], root / "gene", progress=False)
    return dirs, Gene.load(g.path)


def test_tied_head_stored_twice_merges_like_apply(tied, tmp_path):
    dirs, gene = tied
    assert {"embed", "lm_head"} <= set(gene.layer_keys())
    coeffs = {"embed": 0.5, "lm_head": 2.0, "layer.1": 0.75}
    safegene.apply(gene, dirs["task"], tmp_path / "o", coeffs=coeffs, progress=False)
    want, _ = lm.load_model(tmp_path / "o", device="cpu")

    model, _ = lm.load_model(dirs["task"], device="cpu")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    plan = MergePlan(model, gene, ["embed", "lm_head", "layer.1"])
    assert "lm_head.weight" not in plan.names and "lm_head" not in plan.keys
    plan.set([coeffs[k] for k in plan.keys])
    assert torch.equal(_logits(model, IDS), _logits(want, IDS))
    plan.restore()

    fresh, _ = lm.load_model(dirs["task"], device="cpu")
    used = safegene.apply_to_model(fresh, gene, coeffs)
    assert "lm_head.weight" not in used
    assert torch.equal(_logits(fresh, IDS), _logits(want, IDS))

    with pytest.raises(GeneError, match="tied to 'model.embed_tokens.weight'"):
        MergePlan(model, gene, ["lm_head"])


def test_tied_head_stored_twice_calibrates(tied):
    dirs, gene = tied
    c = calibrate(gene, dirs["task"], tm.HARMFUL, tm.BENIGN, layers="embed,lm_head,layer.1", steps=2, init=1.0,
                  device="cpu", log=None)
    assert set(c.coeffs) >= {"embed", "layer.1"}
    json.dumps(c.coeffs)


# ---- the low-memory mode: λ τ in activation space -------------------------------------------------------
def _ce(logits, ids):
    return torch.nn.functional.cross_entropy(logits[0, :-1].double(), ids[0, 1:])


IDS2 = torch.tensor([[2, 9, 10, 11, 12, 13, 14, 15]])


@pytest.mark.parametrize("keys", [["layer.1", "layer.3"], ["embed", "layer.2", "lm_head", "final_norm"]])
def test_lowmem_lambda_gradient_equals_weight_space_in_float64(family, keys):
    from safegene.method.lowmem import LowMemPlan

    dirs, gene = family
    model, _ = lm.load_model(dirs["task"], device="cpu", dtype="f32")
    model = model.double().requires_grad_(False)  # as calibrate does: only λ is trained
    plan = LowMemPlan(model, gene, keys)
    lam = torch.tensor([0.7 + 0.3 * i for i in range(plan.num_keys)], dtype=torch.float64, requires_grad=True)
    ws = merge.gene_merge(lam, plan)
    out = torch.func.functional_call(model, dict(zip(plan.names, ws)), (IDS2,)).logits
    _ce(out, IDS2).backward()
    got = lam.grad.clone()
    plan.restore()
    assert not any(p.grad is not None for p in model.parameters())  # no weight gradient exists

    # reference: W⁰ + λ τ in weight space, float64 autograd
    lam2 = lam.detach().clone().requires_grad_(True)
    taus = gene.load_vectors(plan.names)
    params = {n: dict(model.named_parameters())[n].detach() + lam2[plan.key_of[i]] * taus[n].double()
              for i, n in enumerate(plan.names)}
    _ce(torch.func.functional_call(model, params, (IDS2,)).logits, IDS2).backward()
    assert torch.allclose(got, lam2.grad, rtol=1e-10, atol=1e-12), (got, lam2.grad)


def test_lowmem_set_and_restore_leave_the_model_as_it_came(family):
    from safegene.method.lowmem import LowMemPlan

    dirs, gene = family
    model, _ = lm.load_model(dirs["task"], device="cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = _logits(model, IDS)
    plan = LowMemPlan(model, gene, ["layer.2", "layer.3", "final_norm"])
    plan.set([1.0] * plan.num_keys)
    exact, _ = lm.load_model(dirs["task"], device="cpu")
    safegene.apply_to_model(exact, gene, {k: 1.0 for k in plan.keys})
    assert torch.allclose(_logits(model, IDS), _logits(exact, IDS), atol=1e-4)
    plan.restore()
    assert torch.equal(_logits(model, IDS), ref)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not any(m._forward_hooks for m in model.modules())


def test_lowmem_calibrates_to_the_exact_modes_lambda(family):
    dirs, gene = family
    kw = dict(layers=LAYERS, steps=4, init=1.0, lr=0.2, device="cpu", log=None)
    exact = calibrate(gene, dirs["task"], tm.HARMFUL, tm.BENIGN, mode="exact", **kw)
    low = calibrate(gene, dirs["task"], tm.HARMFUL, tm.BENIGN, mode="lowmem", **kw)
    assert low.coeffs == pytest.approx(exact.coeffs, abs=1e-4)
