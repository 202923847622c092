"""Model cards (``README.md`` with a YAML header) for the gene, the ``apply`` output, the LoRA export
and COEFFS, following ``huggingface_hub``'s :class:`~huggingface_hub.ModelCard` conventions.

Every card is built from :class:`~huggingface_hub.ModelCardData` (``library_name``, ``tags``,
``base_model`` where a Hub id is known, and a ``safegene`` block with the machine-readable
facts) and a markdown body, so ``ModelCard.load(path)`` parses it. Cards never name an absolute
local path: sources are Hub ids + commits or base names + content hashes
(:mod:`safegene.io.provenance`).

>>> card = gene_card(Gene.load("gene/").manifest)  # doctest: +SKIP
>>> card.data.tags  # doctest: +SKIP
['safegene', 'safety', 'task-vector', 'safety-gene']
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence

from .atomic import write_text_atomic
from .hub import hub_ref_of_path, parse_hub_id
from .provenance import describe_path, portable_source, scrub_paths, source_ref

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import ModelCard

    from ..gene import Gene

CARD = "README.md"
log = logging.getLogger(__name__)
GENE_TAGS = ["safegene", "safety", "task-vector", "safety-gene"]
APPLY_TAGS = ["safegene", "safety", "task-arithmetic", "merge"]
LORA_TAGS = ["safegene", "safety", "lora", "peft"]
COEFFS_TAGS = ["safegene", "safety", "safety-coefficients"]
_HEADER = re.compile(r"\A---\s*\n.*?\n---\s*\n", re.S)


class Applied(Protocol):
    """What a card needs of one ``apply`` result: where it was written and the λ it used per tensor."""

    out: Path
    coeffs: dict[str, float]


#: huggingface_hub's pattern of a card's YAML block (``huggingface_hub.repocard.REGEX_YAML_BLOCK``),
#: so that reading a target's card needs only ``repocard_data`` (see :func:`_card_text`).
_YAML_BLOCK = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")


def _card_text(data: Mapping[str, Any], body: str) -> str:
    """The text of the card with metadata ``data`` and markdown ``body``: exactly
    ``str(_card(data, body))`` (a test checks it), without importing ``huggingface_hub.ModelCard``,
    whose module loads the Hub client (~0.3 s of every ``apply`` and ``extract`` otherwise)."""
    from huggingface_hub.repocard_data import ModelCardData

    known = {k: v for k, v in data.items() if v not in (None, [], {})}
    return f"---\n{ModelCardData(**known).to_yaml()}\n---\n\n{body.strip()}\n"


def _card(data: Mapping[str, Any], body: str) -> "ModelCard":
    from huggingface_hub import ModelCard

    return ModelCard(_card_text(data, body))


def _fmt(x: Any, digits: int = 4) -> str:
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return "—" if x is None else str(x)


def _source_line(name: str, src: Mapping[str, Any] | None) -> str:
    if not src:
        return f"- **{name}:** not recorded"
    hub = src.get("hub")
    if isinstance(hub, Mapping):
        return f"- **{name}:** [`{hub.get('repo_id')}`](https://huggingface.co/{hub.get('repo_id')}) at revision `{hub.get('revision')}`"
    ref = hub_ref_of_path(src.get("path")) if isinstance(src.get("path"), str) else None
    if ref:
        return f"- **{name}:** [`{ref[0]}`](https://huggingface.co/{ref[0]}) at revision `{ref[1]}`"
    label = src.get("name") or describe_path(str(src.get("path", "?")))
    digest = src.get("sha256") or src.get("headers_sha256")
    kind = "files sha256" if src.get("sha256") else "headers sha256"
    return f"- **{name}:** local checkpoint `{label}`" + (f" ({kind} `{digest}`)" if digest else "")


def _layer_table(layer_stats: Mapping[str, Any], selection: Mapping[str, Any] | None) -> str:
    scores = (selection or {}).get("scores") or {}
    chosen = set((selection or {}).get("selected") or [])
    rows = ["| key | ‖τ‖ | relative change | tensors | selection score | selected |", "|---|---:|---:|---:|---:|:---:|"]
    for key, st in layer_stats.items():
        rows.append(
            f"| `{key}` | {_fmt(st.get('tau_norm'))} | {_fmt(st.get('rel_change'))} | {_fmt(st.get('n_tensors'))} "
            f"| {_fmt(scores.get(key))} | {'✓' if key in chosen else ''} |"
        )
    return "\n".join(rows)


def _keys_line(manifest: Mapping[str, Any], fp: Mapping[str, Any]) -> list[str]:
    """The card's line for a gene that holds only some keys (``extract --keys``, ``select --prune``)."""
    keys = manifest.get("keys")
    if not keys:
        return []
    n = manifest.get("n_tensors")
    held = f"{n} of the family's {len(fp.get('tensors') or {})} tensors" if n is not None else "some of the family's tensors"
    return ["- **keys kept:** " + ", ".join(f"`{k}`" for k in keys) + f" ({held}; the other tensors' vectors are not in this gene)"]


def gene_card(manifest: Mapping[str, Any], *, repo_id: str | None = None) -> "ModelCard":
    """The gene's card: family fingerprint, sources, how the degraded model was made, selection,
    per-layer statistics, intended use and limitations.

    >>> print(gene_card(Gene.load("gene/").manifest).data.safegene["model_type"])  # doctest: +SKIP
    llama
    """
    return _card(*_gene_card_parts(manifest, repo_id))


def _gene_card_parts(manifest: Mapping[str, Any], repo_id: str | None) -> tuple[dict[str, Any], str]:
    fp = manifest.get("fingerprint") or {}
    sources = manifest.get("sources") or {}
    aligned, degraded = sources.get("aligned"), sources.get("degraded")
    sel = manifest.get("selection")
    deg = manifest.get("degradation")
    rounding = manifest.get("rounding") or {}
    base = [r for r in (source_ref(aligned),) if r]
    me = repo_id or "GENE"
    data = {
        "library_name": "safegene",
        "tags": GENE_TAGS,
        "base_model": base or None,
        "safegene": {
            "artifact": "gene",
            "format_version": manifest.get("format_version"),
            "model_type": fp.get("model_type"),
            "num_layers": fp.get("num_layers"),
            "fingerprint_sha256": fp.get("sha256"),
            "storage_dtype": manifest.get("storage_dtype"),
            "selected": list(sel.get("selected") or []) if sel else None,
        },
    }
    lines = [
        f"# Safety gene for the `{fp.get('model_type')}` family",
        "",
        "A [safegene](https://github.com/safegene/safegene) **gene**: per-tensor safety vectors "
        "τ = θ_aligned − θ_degraded for one model family, extracted once and re-applied to any task "
        "fine-tune of that family as θ_safe = θ_task + Σ_l λ_l τ_l with a few per-layer coefficients λ.",
        "",
        "## Family fingerprint",
        "",
        f"- **model_type:** `{fp.get('model_type')}`, **layers:** {fp.get('num_layers')}, "
        f"**tensors:** {len(fp.get('tensors') or {})}",
        f"- **shape fingerprint (sha256):** `{fp.get('sha256')}` — a target must have exactly these tensor names and shapes",
        f"- **storage dtype:** {manifest.get('storage_dtype')} (relative rounding error {_fmt(rounding.get('rel_error'))})",
        *_keys_line(manifest, fp),
        "",
        "## Sources",
        "",
        _source_line("aligned", aligned),
        _source_line("degraded", degraded),
        "",
        "## How the degraded model was made",
        "",
    ]
    if deg:
        lines += [
            f"By `safegene degrade`, recipe **{deg.get('recipe')}**: {deg.get('n_train')} examples "
            f"(data sha256 `{deg.get('data_sha256')}`), {deg.get('steps')} steps at lr {deg.get('lr')}, "
            f"seed {deg.get('seed')}" + (f", LoRA rank {deg.get('lora_rank')}" if deg.get("lora_rank") else "") + ".",
        ]
        if deg.get("recipe_notes"):
            lines += ["", str(deg["recipe_notes"])]
        if deg.get("refusal"):
            lines += ["", "```json", json.dumps(deg["refusal"], indent=1, default=str), "```"]
    else:
        lines.append("Not recorded: the degraded checkpoint was not made by `safegene degrade`.")
    lines += ["", "## Layer selection", ""]
    if sel:
        lines.append(f"Method **{sel.get('method')}**; selected keys: " + ", ".join(f"`{k}`" for k in sel.get("selected") or []) + ".")
    else:
        lines.append("None yet: run `safegene select` to choose the layers that carry safety.")
    lines += ["", "## Statistics", "", _layer_table(manifest.get("layer_stats") or {}, sel), ""]
    lines += [
        "## Intended use",
        "",
        "Restore refusals of harmful requests in task fine-tunes of this family, after calibrating λ on a few examples:",
        "",
        "```bash",
        f"safegene calibrate {me} TASK_MODEL --safety harmful.jsonl --utility task.jsonl -o COEFFS.json",
        f"safegene apply {me} TASK_MODEL --coeffs COEFFS.json -o TASK_MODEL-safe",
        "```",
        "",
        "or in Python: `Gene.from_pretrained(\"" + me + "\")`.",
        "",
        "## Limitations",
        "",
        "- Fits only checkpoints with this exact architecture fingerprint; other families are refused.",
        "- Restores the safety behaviour the aligned model had, no more; it is not a content filter "
        "and does not make a model safe against every attack.",
        "- λ is calibrated per task model; a poorly calibrated λ can cost task accuracy or cause over-refusal. "
        "Evaluate the patched model (`safegene eval`) before deploying it.",
    ]
    return data, "\n".join(lines)


def gene_card_view(manifest: Mapping[str, Any], *, hash_content: bool = False) -> dict[str, Any]:
    """What :func:`gene_card` reads of gene.json, with the sources and the degradation record made
    portable (Hub id + commit, or base name + header hashes, or file hashes with ``hash_content``),
    and the per-tensor tables shared rather than copied (a gene can have 10⁵ tensors).

    >>> gene_card_view(Gene.load("gene/").manifest)["sources"]["aligned"]["name"]  # doctest: +SKIP
    'aligned'
    """
    view = {k: manifest.get(k) for k in ("format_version", "storage_dtype", "fingerprint", "rounding", "selection", "layer_stats", "keys")}
    view["n_tensors"] = len(manifest.get("tensors") or {})
    sources = manifest.get("sources") or {}
    view["sources"] = {k: portable_source(v, hash_content=hash_content) if isinstance(v, Mapping) else v for k, v in sources.items()}
    deg = manifest.get("degradation")
    view["degradation"] = scrub_paths(deg) if deg else None
    return view


def write_gene_card(gene_dir: "str | os.PathLike[str]", manifest: Mapping[str, Any], *, repo_id: str | None = None) -> Path:
    """Write the gene's card (:func:`gene_card` of :func:`gene_card_view`) as ``gene_dir/README.md``.
    ``extract`` calls it, and ``select`` again when it records a selection.

    >>> write_gene_card("gene/", Gene.load("gene/").manifest)  # doctest: +SKIP
    PosixPath('gene/README.md')
    """
    path = write_text_atomic(Path(gene_dir) / CARD, _card_text(*_gene_card_parts(gene_card_view(manifest), repo_id)))
    log.debug("wrote the gene card %s", path)
    return path


def coeffs_card(doc: Mapping[str, Any], *, repo_id: str | None = None) -> "ModelCard":
    """The card of a COEFFS repository: λ per key and how it was calibrated.

    >>> coeffs_card({"coeffs": {"layer.3": 1.0}}).data.safegene["coeffs"]  # doctest: +SKIP
    {'layer.3': 1.0}
    """
    lam = dict(doc.get("coeffs") or {})
    data = {"library_name": "safegene", "tags": COEFFS_TAGS,
            "safegene": {"artifact": "coeffs", "coeffs": lam, "gene": doc.get("gene"), "target": doc.get("target")}}
    me = repo_id or "COEFFS"
    rows = ["| key | λ |", "|---|---:|"] + [f"| `{k}` | {_fmt(v)} |" for k, v in lam.items()]
    body = [
        "# safegene coefficients",
        "",
        f"Per-layer coefficients λ for the gene `{doc.get('gene')}` on the task model `{doc.get('target')}`"
        + (f", calibrated by `{doc.get('method')}`." if doc.get("method") else "."),
        "",
        *rows,
        "",
        "```bash",
        f"safegene apply GENE TASK_MODEL --coeffs {me} -o TASK_MODEL-safe",
        "```",
    ]
    return _card(data, "\n".join(body))


def _per_key(gene: "Gene", lam: Mapping[str, float]) -> dict[str, float | list[float]]:
    """λ per coefficient key from per-tensor λ: the value, or [min, max] when tensors of a key differ."""
    by_key: dict[str, list[float]] = {}
    for name, v in lam.items():
        by_key.setdefault(gene.layer_key(name), []).append(float(v))
    out: dict[str, float | list[float]] = {}
    for k in gene.layer_keys():
        vals = by_key.get(k)
        if vals:
            out[k] = vals[0] if len(set(vals)) == 1 else [min(vals), max(vals)]
    return out


def gene_ref(gene: "Gene") -> str:
    """How a card names a gene: ``org/name@commit`` when loaded from the Hub, else its directory name."""
    ref = hub_ref_of_path(gene.path.resolve())
    return f"{ref[0]}@{ref[1]}" if ref else gene.path.resolve().name


def _target_refs(target: "str | os.PathLike[str]") -> tuple[str | None, str, str | None]:
    """(base Hub id or None, how to name the base, adapter name or None) for an apply target."""
    s = os.fspath(target)
    adapter = None
    if "+" in s and not Path(s).expanduser().exists():
        s, _, adapter = s.rpartition("+")
    local = Path(s).expanduser()
    if local.exists():
        ref = hub_ref_of_path(local.resolve())
        base = (ref[0], f"{ref[0]}@{ref[1]}") if ref else (None, local.resolve().name)
    else:
        hub = parse_hub_id(s)
        base = (hub[0], s) if hub else (None, describe_path(s))
    return base[0], base[1], (describe_path(adapter) if adapter else None)


def _own_card(path: Path) -> tuple[dict[str, Any], str]:
    """The target's card copied into the output: (its metadata, its body)."""
    if not path.is_file():
        return {}, ""
    text = path.read_text(encoding="utf-8", errors="replace")
    try:  # as ModelCard(text, ignore_metadata_errors=True) reads it (.data.to_dict(), .text)
        import yaml
        from huggingface_hub.repocard_data import ModelCardData

        m = _YAML_BLOCK.search(text)
        if not m:
            return {}, text
        meta = yaml.safe_load(m.group(2))
        if meta is None:
            meta = {}
        if not isinstance(meta, dict):
            raise ValueError("the card's metadata block is not a mapping")
        return ModelCardData(**meta, ignore_metadata_errors=True).to_dict(), text[m.end():]
    except Exception:  # a card we cannot parse is still kept, as text
        return {}, _HEADER.sub("", text)


def apply_card(
    gene: "Gene", target: "str | os.PathLike[str]", result: Applied, *, eval_summary: Mapping[str, Any] | None = None,
) -> "ModelCard":
    """The card of an ``apply`` output: target (``base_model``), gene, λ per key, the eval summary
    when given, and the target's own card below a heading.

    >>> apply_card(Gene.load("gene/"), "org/task-model", result).data.base_model  # doctest: +SKIP
    'org/task-model'
    """
    return _card(*_apply_card_parts(gene, target, result, eval_summary))


def _apply_card_parts(gene: "Gene", target: "str | os.PathLike[str]", result: Applied,
                      eval_summary: Mapping[str, Any] | None) -> tuple[dict[str, Any], str]:
    base_id, base_name, adapter = _target_refs(target)
    own_data, own_body = _own_card(Path(result.out) / CARD)
    lam = _per_key(gene, result.coeffs)
    gid = gene_ref(gene)
    fp = gene.fingerprint
    data: dict[str, Any] = {k: own_data.get(k) for k in ("license", "language", "pipeline_tag", "datasets")}
    data.update({
        "library_name": "transformers",
        "tags": list(dict.fromkeys(APPLY_TAGS + [t for t in own_data.get("tags") or [] if isinstance(t, str)])),
        "base_model": base_id,
        "safegene": {"artifact": "apply", "gene": gid, "fingerprint_sha256": fp.get("sha256"), "target": base_name,
                     "adapter": adapter, "coeffs": lam},
    })
    name = Path(result.out).name
    rows = ["| key | λ |", "|---|---:|"] + [
        f"| `{k}` | {_fmt(v) if not isinstance(v, list) else f'{_fmt(v[0])} … {_fmt(v[1])}'} |" for k, v in lam.items()
    ]
    tgt = f"`{base_name}`" + (f" with the LoRA adapter `{adapter}` merged" if adapter else "")
    body = [
        f"# {name}",
        "",
        f"{tgt} with the safety gene `{gid}` (a `{fp.get('model_type')}` family gene) added by "
        "[safegene](https://github.com/safegene/safegene): θ = θ_target + Σ_k λ_k τ_k, "
        "where τ_k = θ_aligned − θ_degraded for the tensors of key k.",
        "",
        "## Coefficients",
        "",
        *(rows if lam else ["All λ are zero: the weights are the target's."]),
        "",
        "Reproduce with `safegene apply GENE TARGET --coeffs COEFFS.json -o OUT` (λ as above, missing keys = 0).",
    ]
    if eval_summary:
        body += ["", "## Evaluation", "", "| metric | value |", "|---|---:|"]
        body += [f"| {k} | {_fmt(v)} |" for k, v in eval_summary.items()]
    if own_body.strip():
        body += ["", f"## Original model card ({base_name})", "", own_body.strip()]
    return data, "\n".join(body)


def write_apply_cards(
    gene: "Gene",
    targets: Sequence["str | os.PathLike[str]"],
    results: "Applied | Sequence[Applied]",
    *,
    eval_summary: Mapping[str, Any] | None = None,
) -> None:
    """Write :func:`apply_card` as ``README.md`` into every ``apply`` output (the target's own card,
    which ``apply`` copied there, is kept below a heading).

    >>> write_apply_cards(g, ["task/"], [result])  # doctest: +SKIP
    """
    res = [results] if not isinstance(results, Sequence) else list(results)
    for t, r in zip(targets, res):
        write_text_atomic(Path(r.out) / CARD, _card_text(*_apply_card_parts(gene, t, r, eval_summary)))
        log.debug("wrote the model card %s", Path(r.out) / CARD)


def _write_adapter_config(out: Path, base: str | None) -> None:
    """Re-write ``adapter_config.json`` through ``peft.LoraConfig.save_pretrained`` (when PEFT is
    installed), so that it holds every field this PEFT version expects, with the base model set."""
    path = out / "adapter_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = base
    try:
        from peft import LoraConfig
    except ImportError:
        write_text_atomic(path, json.dumps(cfg, indent=2) + "\n")
        return
    known = {f.name for f in fields(LoraConfig)}
    lc = LoraConfig(**{k: v for k, v in cfg.items() if k in known and k != "peft_type"})
    with tempfile.TemporaryDirectory(dir=out, prefix=".peft-") as td:
        lc.save_pretrained(td)
        os.replace(Path(td) / "adapter_config.json", path)


def lora_card(gene: "Gene", summary: Mapping[str, Any], base: str | None) -> "ModelCard":
    """The card of an exported LoRA adapter: gene, λ, rank, reconstruction error, dropped tensors.

    >>> lora_card(Gene.load("gene/"), summary, "org/llama-3-8b-instruct").data.library_name  # doctest: +SKIP
    'peft'
    """
    mods = summary.get("modules") or {}
    lam: dict[str, float] = {}
    for m in mods.values():
        lam.setdefault(str(m.get("layer")), float(m.get("lambda", 0.0)))
    gid = gene_ref(gene)
    base_id = base if base and parse_hub_id(base) and not Path(base).exists() else None
    data = {
        "library_name": "peft",
        "tags": LORA_TAGS,
        "base_model": base_id,
        "safegene": {"artifact": "lora", "gene": gid, "fingerprint_sha256": gene.fingerprint.get("sha256"), "coeffs": lam,
                     "rank_max": summary.get("rank_max"), "rel_error": summary.get("rel_error"),
                     "dropped_share": summary.get("dropped_share")},
    }
    base_txt = f"`{base_id}`" if base_id else ("a local model (`" + Path(base).name + "`)" if base else "any model of the family")
    body = [
        "# Safety LoRA adapter (safegene)",
        "",
        f"The safety gene `{gid}` scaled by λ, as a PEFT LoRA adapter (truncated SVD of λ·τ per linear weight), "
        f"for {base_txt} or any task fine-tune of the `{gene.fingerprint.get('model_type')}` family.",
        "",
        f"- modules: {summary.get('n_modules')}, max rank {summary.get('rank_max')}, {summary.get('params', 0):,} parameters, "
        f"dtype {summary.get('dtype')}",
        f"- relative reconstruction error ‖λτ − BA‖/‖λτ‖: {_fmt(summary.get('rel_error'))} "
        f"(worst module {_fmt(summary.get('max_module_rel_error'))})",
        f"- dropped (norms, embeddings, biases): {len(summary.get('dropped') or {})} tensors, "
        f"{_fmt(100 * float(summary.get('dropped_share') or 0.0), 3)} % of ‖λτ‖",
        "",
        "| key | λ |",
        "|---|---:|",
        *[f"| `{k}` | {_fmt(v)} |" for k, v in lam.items()],
        "",
        "```python",
        "from peft import AutoPeftModelForCausalLM, PeftModel",
        "model = AutoPeftModelForCausalLM.from_pretrained(ADAPTER_DIR)          # on the recorded base",
        "model = PeftModel.from_pretrained(task_model, ADAPTER_DIR).merge_and_unload()  # on a task model",
        "```",
        "",
        "Per-module errors are in `safegene_lora.json`.",
    ]
    return _card(data, "\n".join(body))


def write_lora_card(
    out_dir: "str | os.PathLike[str]", gene: "Gene", summary: Mapping[str, Any], base_model_name_or_path: str | None = None,
) -> None:
    """Finish an exported adapter: ``adapter_config.json`` re-written by PEFT's own ``LoraConfig``
    (when PEFT is installed) with ``base_model_name_or_path``, and the card as ``README.md``.

    >>> write_lora_card("lora/", g, summary, "meta-llama/Llama-3.2-1B-Instruct")  # doctest: +SKIP
    """
    out = Path(out_dir)
    _write_adapter_config(out, base_model_name_or_path)
    write_text_atomic(out / CARD, str(lora_card(gene, summary, base_model_name_or_path)))


__all__ = ["apply_card", "coeffs_card", "gene_card", "gene_card_view", "gene_ref", "lora_card", "write_apply_cards", "write_gene_card",
           "write_lora_card"]
