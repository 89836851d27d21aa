"""The kinds of folder the report knows: how each is recognised (the file it holds), the models it evaluated, what it
records about its own making, and its section of the report. A new kind of output is one more entry in KINDS.

A figure that a command draws itself (relearning curves, jailbreak bars, a sweep's frontier, the analyses) is drawn
here by calling that command's own plotting function on the JSON it wrote."""
from __future__ import annotations

from .collect import Item, Kind, ModelResult, read_json
from .render import Code, Note, Para, Table, fmt, seconds

ROLES = ("retain", "target")


# ---- unlearn runs (also inside the demo) -------------------------------------------------------------------------

def _unlearn_facts(run: dict) -> dict:
    total = sum(run.get(k) or 0 for k in ("setup_seconds", "train_seconds")) or None
    return {"command": run.get("command"), "versions": run.get("versions"), "seed": run.get("seed"),
            "seconds": total}


def unlearn_blocks(run: dict, ctx, references=()) -> list:
    """What an unlearn run's run.json shows: settings, the training curves and the in-training evaluation."""
    from ..methods.cli import EVAL_KEYS
    from .figures import finite, in_training_figure, training_figure

    cfg = run.get("config") or {}
    steps = run.get("steps") or []
    mem = run.get("peak_memory_bytes")
    retain = f" and {run['n_retain']} retain" if run.get("n_retain") else ""
    blocks = [Para(f"Method {run.get('method')}: {run.get('total_steps')} optimizer steps on {run.get('n_forget')} "
                   f"forget{retain} examples; {run.get('n_trained_parameters') or 0:,} "
                   f"parameters trained; training {seconds(run.get('train_seconds'))} "
                   f"({fmt(run.get('seconds_per_step'), 3)} s per step)"
                   + (f"; peak memory {mem / 2**30:.2f} GiB." if mem else ".")),
              Code("settings: " + ", ".join(f"{k}={v}" for k, v in cfg.items() if v is not None))]
    if run.get("interrupted_at") is not None:
        blocks.append(Note(f"This run was interrupted at step {run['interrupted_at']}: the curves stop there."))
    if steps:
        blocks.append(ctx.figure("training", f"Training loss and gradient norm — {run.get('method')}",
                                 "Per optimizer step; the loss terms are those the method logs (e.g. its forget "
                                 "and retain parts).", lambda p: training_figure(steps, p)))
    else:
        blocks.append(Note("No training steps were logged, so there is no training curve."))
    record = run.get("in_training_eval")
    points = ([(0, record["before"])] if record and record.get("before") else []) + [
        (s["step"], s["eval"]) for s in steps if isinstance(s.get("eval"), dict)]
    if not points:
        blocks.append(Note("No in-training evaluation in this run: `unlearnkit unlearn --eval-every N` on a TOFU "
                           "split logs forget / retain metrics every N steps."))
        return blocks
    keys = [k for k in EVAL_KEYS if any(finite(e.get(k)) for _, e in points)]
    missing = [k for k in EVAL_KEYS if k not in keys]
    kept = record.get("kept_step") if record else None
    blocks.append(ctx.figure("in-training-eval", f"In-training evaluation — {run.get('method')}",
                             f"Evaluated every {record.get('eval_every') if record else '?'} steps; "
                             f"rule {record.get('rule') if record else 'last'!r}, kept step {kept}. Reference lines: "
                             "the retain model and the target, where their evaluation is given.",
                             lambda p: in_training_figure(points, keys, p, references, kept)))
    if "forget_quality" in missing:
        blocks.append(Note("Forget quality was not computed during training: the run had no --retain-log (the retain "
                           "model's EVAL.json of the split)."))
    if record and record.get("note"):
        blocks.append(Note(record["note"]))
    return blocks


def _unlearn_section(item: Item, ctx) -> list:
    return unlearn_blocks(item.doc, ctx, ctx.references(item))


# ---- evaluations -------------------------------------------------------------------------------------------------

def _eval_models(item: Item) -> list:
    if not _is_tofu(item.doc):
        return []
    out = [ModelResult(item.label, "model", item.doc.get("summary") or {}, item.label, item.path / "EVAL.json")]
    retain = item.path / "retain" / "EVAL.json"  # `eval tofu --retain-model`: the reference evaluated beside it
    if retain.is_file():
        summary = read_json(item.path / "retain" / "SUMMARY.json") if (item.path / "retain" / "SUMMARY.json"
                                                                        ).is_file() else {}
        out.append(ModelResult(f"{item.label} (retain)", "retain", summary, item.label, retain))
    return out


def _is_tofu(doc: dict) -> bool:
    return "forget" in (doc.get("sets") or {}) or str(doc.get("format", "")) == "unlearnkit-eval/1"


def _summary_table(summary: dict, caption: str) -> Table:
    rows = [[k, v] for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return Table(["metric", "value"], rows, caption)


def _null_notes(summary: dict) -> list:
    why = summary.get("null_reasons") or {}
    return [Note("Not computed: " + "; ".join(f"{k} — {v}" for k, v in why.items()) + ".")] if why else []


def _eval_section(item: Item, ctx) -> list:
    doc = item.doc
    s = doc.get("summary") or {}
    if not _is_tofu(doc):
        what = str(doc.get("format", "")).replace("unlearnkit-eval-", "").split("/")[0] or "evaluation"
        return [Para(f"{what.upper()} evaluation."), _summary_table(s, "Headline numbers (SUMMARY.json)"),
                *_null_notes(s)]
    settings = doc.get("settings") or {}
    blocks = [Para(f"TOFU evaluation of split {doc.get('split')}: truth-ratio variant {settings.get('truth_ratio')}, "
                   f"greedy answers of at most {settings.get('max_new_tokens')} tokens, "
                   f"{'behind an ECO guard' if settings.get('guard') else 'no guard'}. Its headline numbers are in "
                   "the results table and the comparison figures above.")]
    if (item.path / "retain" / "EVAL.json").is_file():
        blocks.append(Para("The retain model was evaluated beside it (retain/) and is its forget-quality reference."))
    return blocks + _null_notes(s)


def _aggregate_models(item: Item) -> list:
    return [ModelResult(item.label, "model", item.doc, item.label)] if "forget_quality" in item.doc else []


def _aggregate_section(item: Item, ctx) -> list:
    return [Para("Headline numbers re-aggregated from per-sample logs (`eval aggregate`): in the results table; no "
                 "per-sample values here, so no histogram or ROC curve for it."), *_null_notes(item.doc)]


# ---- demo --------------------------------------------------------------------------------------------------------

def _demo_models(item: Item) -> list:
    out = []
    for name, summary in (item.doc.get("summaries") or {}).items():
        sub = name.split(" ")[0]
        path = item.path / "eval" / sub / "EVAL.json"
        out.append(ModelResult(name, sub if sub in ROLES else "model", summary, item.label,
                               path if path.is_file() else None))
    return out


def _demo_run(item: Item) -> dict | None:
    path = item.path / "unlearned" / "run.json"
    return read_json(path) if path.is_file() else None


def _demo_facts(item: Item) -> dict:
    run = _demo_run(item) or {}
    return {**_unlearn_facts(run), "seconds": item.doc.get("seconds")}


def _demo_section(item: Item, ctx) -> list:
    doc = item.doc
    blocks = [Para(f"`unlearnkit demo`: the target and retain models of TOFU split {doc.get('split')} (prepared "
                   f"once, cached), the forget authors unlearned from the target with {doc.get('method')}, and all "
                   "three evaluated; their numbers are in the results table and comparison figures above.")]
    retain = (doc.get("summaries") or {}).get("retain") or {}
    if retain.get("model_utility") is None:
        blocks.append(Note("The demo evaluated the retain model only on what forget quality needs (forget and "
                           "holdout sets), so it has no model utility; `unlearnkit demo --full-retain-eval` evaluates "
                           "it on every set."))
    run = _demo_run(item)
    if run is None:
        return blocks + [Note("No unlearned/run.json: no training curves.")]
    return blocks + unlearn_blocks(run, ctx, ctx.references(item))


# ---- sweeps ------------------------------------------------------------------------------------------------------

def _sweep_models(item: Item) -> list:
    from ..sweep_cli import point_folder

    out = []
    for p in item.doc.get("points") or []:
        path = item.path / "points" / point_folder(p["name"]) / "EVAL.json"
        out.append(ModelResult(f"{item.label}: {p['name']}", "model", p.get("summary") or {}, item.label,
                               path if path.is_file() else None, group=item.label))
    return out


def _sweep_section(item: Item, ctx) -> list:
    from ..sweep_cli import frontier_figure

    doc = item.doc
    rows, front = doc.get("points") or [], doc.get("pareto") or []
    retain = ctx.references(item, "retain")
    blocks = [Para(f"Sweep of {doc.get('method')} on {doc.get('split')}: {len(rows)} points over "
                   + ", ".join(f"{k} ∈ {{{', '.join(map(str, v))}}}" for k, v in (doc.get("grid") or {}).items())
                   + (f"; fixed {doc.get('fixed')}" if doc.get("fixed") else "")
                   + f"; retain reference: {doc.get('retain_reference')}."),
              ctx.figure("frontier", f"Sweep frontier — {item.label}",
                         "Forget quality (log) against model utility per point; the Pareto set joined; the target "
                         "and the retain model as reference lines where known.",
                         lambda p: frontier_figure(rows, front, p, reference=retain[0].summary if retain else None,
                                                   target=doc.get("target"))),
              Table(["point", "steps", "forget quality", "model utility", "forget p(a|q)", "forget ROUGE-L",
                     "Pareto", "train s", "eval s"],
                    [[r["name"], r.get("steps"), r["summary"].get("forget_quality"), r["summary"].get("model_utility"),
                      r["summary"].get("forget_prob"), r["summary"].get("forget_rougeL_recall"),
                      "yes" if r["name"] in front else "", r.get("train_seconds"), r.get("eval_seconds")]
                     for r in rows], "Every point (SWEEP.json)")]
    if doc.get("target") is None:
        blocks.append(Note("No target log was given to the sweep (--target-log): no target reference in its "
                           "frontier."))
    return blocks


def _sweep_facts(item: Item) -> dict:
    return {"seconds": item.doc.get("seconds"), "seed": (item.doc.get("fixed") or {}).get("seed")}


# ---- attacks -----------------------------------------------------------------------------------------------------

def _attack_facts(item: Item) -> dict:
    subjects = item.doc.get("subjects") or {}
    return {"seed": (item.doc.get("settings") or {}).get("seed"),
            "seconds": sum(s.get("seconds") or 0 for s in subjects.values()) or None}


def _attack_notes(doc: dict) -> list:
    return [Note(n) for n in doc.get("notes") or []]


def _relearn_section(item: Item, ctx) -> list:
    from ..attacks.figures import relearn_figure

    doc = item.doc
    st = doc.get("settings") or {}
    subjects = doc.get("subjects") or {}
    rows = []
    for name, res in subjects.items():
        curve = res.get("curve") or [{}]
        first, last = curve[0], curve[-1]
        rows.append([name, res.get("role"), first.get("forget_prob"), last.get("forget_prob"),
                     first.get("forget_quality"), last.get("forget_quality"), last.get("relearned_prob"),
                     last.get("step")])
    blocks = [Para(f"Relearning attack on {doc.get('split')}: each subject fine-tuned on {st.get('n')} forget QA "
                   f"({st.get('relearn_set')}) for {st.get('steps')} steps (lr {st.get('lr')}), the "
                   f"{len(doc.get('heldout_questions') or [])} other forget QA scored every {st.get('eval_every')} "
                   "steps. Controls: the retain model (never saw the forget authors) and the target (never "
                   "unlearned)."),
              ctx.figure("relearn", f"Relearning curves — {item.label}",
                         "Held-out forget metrics against relearning steps; controls in the reference styles.",
                         lambda p: relearn_figure(subjects, p)),
              Table(["subject", "role", "forget p, step 0", "forget p, last", "FQ, step 0", "FQ, last",
                     "relearned p, last", "last step"], rows, "Before and after relearning (held-out forget QA)")]
    if doc.get("forget_quality_reference") is None:
        blocks.append(Note("Forget quality under relearning needs the retain model: neither --retain-log nor the "
                           "retain control was given, so it is not computed."))
    else:
        blocks.append(Para(f"Forget quality reference: {doc['forget_quality_reference']}."))
    return blocks + _attack_notes(doc)


def _jailbreak_section(item: Item, ctx) -> list:
    from ..attacks.figures import jailbreak_figure

    doc = item.doc
    summary = doc.get("summary") or {}
    roles = {n: s.get("role", "model") for n, s in (doc.get("subjects") or {}).items()}
    rows = [[name, attack, v.get("forget_prob"), v.get("forget_truth_ratio"), v.get("forget_quality"),
             v.get("forget_rougeL_recall"), v.get("flag_rate"), v.get("n")]
            for name, per in summary.items() for attack, v in per.items()]
    blocks = [Para(f"Jailbreak / extraction attacks on the forget QA of {doc.get('split')}: "
                   f"{', '.join((doc.get('settings') or {}).get('attacks') or [])}; the clean question is the "
                   "baseline. A forget p(a|q) or ROUGE-L well above the clean value means the attack extracts what "
                   "unlearning hid."),
              ctx.figure("jailbreak", f"Forget p(a|q) per attack — {item.label}",
                         "Bars per attack and subject; the retain model and the target hatched grey.",
                         lambda p: jailbreak_figure(summary, roles, p)),
              Table(["subject", "attack", "forget p(a|q)", "truth ratio", "forget quality", "ROUGE-L", "flag rate",
                     "n"], rows, "Per subject and attack (ATTACK.json summary)")]
    if all(v.get("forget_quality") is None for per in summary.values() for v in per.values()):
        blocks.append(Note("Forget quality under attack needs the retain model (retain control or --retain-log): "
                           "not computed here."))
    return blocks + _attack_notes(doc)


# ---- analyses ----------------------------------------------------------------------------------------------------

def _markov_section(item: Item, ctx) -> list:
    from ..analysis.markov import plot

    doc = item.doc
    claim = (doc.get("summary") or {}).get("claim") or {}
    rows = [[f"{v} / {m}", k.get("kl_retain"), k.get("kl_forget1"), k.get("kl_forget2")]
            for v, per in ((doc.get("summary") or {}).get("final") or {}).items() for m, k in per.items()]
    return [Para("SimNPO's synthetic study: a small GPT-2 pretrained on retain + forget1 Markov chains, forget1 + "
                 "forget2 unlearned with NPO and SimNPO; per-token KL to the retain-only model after every step."),
            ctx.figure("markov", "Markov-chain study: forget-side KL against retain KL",
                       "Each unlearning path starts at the pretrained model (star). x: damage to the retain chain "
                       "(KL on its test set, lower is better); y: KL on the forget chains' test sets; both to the "
                       "retain-only model (docs/analyses.md).",
                       lambda p: plot(doc, p)),
            Table(["variant / method", "KL retain", "KL forget1", "KL forget2"], rows, "After the last step"),
            Para(f"Claim: {claim.get('statement', '—').rstrip('.')}. Holds in every variant and forget set: "
                 f"{'yes' if claim.get('holds_everywhere') else 'no'}.")]


def _confidence_section(item: Item, ctx) -> list:
    from ..analysis.confidence import confidence_figure

    doc = item.doc
    roles = {n: s.get("role", "model") for n, s in (doc.get("subjects") or {}).items()}
    rows = [[name, s, v.get("max_prob"), v.get("entropy"), v.get("tokens")]
            for name, per in (doc.get("summary") or {}).items() for s, v in per.items()]
    return [Para(f"Token confidence on {doc.get('split')}: teacher-forced gold answers; mean max-softmax probability "
                 "and entropy of the next-token distributions per set and model."),
            ctx.figure("confidence", f"Token confidence — {item.label}",
                       "Grouped bars per set; the target and the retain model hatched grey.",
                       lambda p: confidence_figure(doc.get("per_row") or {}, roles, p)),
            Table(["model", "set", "max-softmax p", "entropy (nats)", "tokens"], rows)]


def _difficulty_section(item: Item, ctx) -> list:
    from ..analysis.difficulty import SUBSETS, difficulty_figure

    doc = item.doc
    summary = doc.get("summary") or {}
    rows = [[name] + [per.get(s, {}).get("forget_quality") for s in ("all",) + SUBSETS]
            for name, per in summary.items()]
    return [Para(f"Forget quality per forget subset on {doc.get('split')} at matched budgets "
                 f"({doc.get('fixed') or 'method defaults'})."),
            ctx.figure("difficulty", f"Forget quality per subset — {item.label}",
                       "Bars per subset and model (log scale).", lambda p: difficulty_figure(summary, p)),
            Table(["model", "all", *SUBSETS], rows, "Forget quality (KS p-value)")]


def _alignment_section(item: Item, ctx) -> list:
    from ..analysis.alignment import alignment_figure

    doc = item.doc
    points, target = doc.get("points") or [], doc.get("target") or {}
    rows = [[p.get("c"), p.get("c_over_norm"), p.get("cosine"), p.get("norm"), p.get("forget_prob"),
             p.get("forget_quality")] for p in points]
    return [Para(f"RMU at layer {doc.get('layer')}: one short run per steering coefficient c; the target's mean "
                 f"activation norm there is {fmt(target.get('norm'))}."),
            ctx.figure("alignment", f"Layer alignment with RMU's direction u — {item.label}",
                       "Cosine of layer activations to u and forget p(a|q) against c / ‖h_l‖; the target (before "
                       "unlearning) as the reference line.", lambda p: alignment_figure(points, target, p)),
            Table(["c", "c / ‖h‖", "cos(h, u)", "‖h‖", "forget p(a|q)", "forget quality"], rows)]


def _layers_section(item: Item, ctx) -> list:
    from ..analysis.layers import layers_figure  # analyze layers' own figure

    doc = item.doc
    norms = {n["layer"]: n["mean_token_norm"] for n in (doc.get("norms") or {}).get("per_layer") or []}
    t = doc.get("target") or {}
    rows = [["target (before)", "—", None, t.get("forget_prob"), t.get("forget_truth_ratio"), t.get("forget_quality"),
             t.get("retain_prob"), None]]
    failed = []
    for method, runs in (doc.get("runs") or {}).items():
        for r in runs:
            if "error" in r:
                failed.append(f"{method} at layer {r['layer']}: {r['error']}")
                continue
            rows.append([method, r["layer"], norms.get(r["layer"]), r.get("forget_prob"), r.get("forget_truth_ratio"),
                         r.get("forget_quality"), r.get("retain_prob"), r.get("train_seconds")])
    blocks = [Para(f"One unlearning run per method and layer on {doc.get('split')}: "
                   f"{', '.join(doc.get('methods') or [])} at layers {doc.get('layers')}"
                   + (f", fixed {doc.get('fixed')}" if doc.get("fixed") else "") + "; each scored against the "
                   "retain model, beside the frozen target's mean activation norm per layer."),
              ctx.figure("layers", f"Unlearning per layer — {item.label}",
                         "Forget p(a|q), forget quality (log) and retain p(a|q) against the layer trained, one line per "
                         "method, the target (before unlearning) as the reference line; the target's mean ‖h_l‖ on "
                         "forget tokens.", lambda p: layers_figure(doc, p)),
              Table(["method", "layer", "‖h_l‖", "forget p(a|q)", "truth ratio", "forget quality", "retain p(a|q)",
                     "train s"], rows, "Per method and layer (LAYERS.json)")]
    if failed:
        blocks.append(Note("Runs that diverged (not drawn): " + "; ".join(failed) + "."))
    return blocks


# ---- ECO ---------------------------------------------------------------------------------------------------------

def _eco_section(item: Item, ctx) -> list:
    metrics = read_json(item.path / "metrics.json")
    rows = [[f"FPR {k}", v] for k, v in (metrics.get("fpr") or {}).items()]
    rows += [[f"FNR {k}", v] for k, v in (metrics.get("fnr") or {}).items()]
    search = metrics.get("search") or {}
    rows += [[f"search {k}", v] for k, v in search.items() if isinstance(v, (int, float))]
    return [Para(f"ECO artifact: prompt classifier (threshold τ = {fmt(metrics.get('tau'))}, target FPR "
                 f"{fmt(metrics.get('target_fpr'))}) and embedding corruption "
                 f"{(item.doc.get('corruption') or {}).get('method')}; {len(item.doc.get('entities') or [])} "
                 "entities. Its attacks appear in the attack sections when it was attacked."),
            Table(["quantity", "value"], rows, "Classifier error rates and corruption search (metrics.json)")]


def _eco_facts(item: Item) -> dict:
    meta = item.doc.get("metadata") or {}
    return {"command": meta.get("command"), "seed": (item.doc.get("corruption") or {}).get("seed")}


def _analysis_facts(item: Item) -> dict:
    doc = item.doc
    return {"seed": (doc.get("settings") or doc.get("fixed") or {}).get("seed"), "seconds": doc.get("seconds")}


KINDS: list[Kind] = [
    Kind("demo", "Demo", "summary.json", accept=lambda f, d: "summaries" in d and (f / "eval").is_dir(),
         models=_demo_models, facts=_demo_facts, section=_demo_section),
    Kind("sweep", "Sweep", "SWEEP.json", accept=lambda f, d: "points" in d, models=_sweep_models,
         facts=_sweep_facts, section=_sweep_section),
    Kind("relearn", "Relearning attack", "ATTACK.json", accept=lambda f, d: d.get("attack") == "relearn",
         facts=_attack_facts, section=_relearn_section),
    Kind("jailbreak", "Jailbreak attack", "ATTACK.json", accept=lambda f, d: d.get("attack") == "jailbreak",
         facts=_attack_facts, section=_jailbreak_section),
    Kind("markov", "Markov-chain analysis", "MARKOV.json", accept=lambda f, d: "variants" in d,
         facts=_analysis_facts, section=_markov_section),
    Kind("confidence", "Confidence analysis", "CONFIDENCE.json", accept=lambda f, d: "summary" in d,
         facts=_analysis_facts, section=_confidence_section),
    Kind("difficulty", "Difficulty analysis", "DIFFICULTY.json", accept=lambda f, d: "summary" in d,
         facts=_analysis_facts, section=_difficulty_section),
    Kind("alignment", "Alignment analysis", "ALIGNMENT.json", accept=lambda f, d: "points" in d,
         facts=_analysis_facts, section=_alignment_section),
    Kind("layers", "Layer analysis", "LAYERS.json", accept=lambda f, d: "runs" in d and "norms" in d,
         facts=lambda item: {"command": item.doc.get("command"), "versions": item.doc.get("versions"),
                             "seed": (item.doc.get("fixed") or {}).get("seed")}, section=_layers_section),
    Kind("unlearn", "Unlearn run", "run.json", accept=lambda f, d: "method" in d and "steps" in d,
         facts=lambda item: _unlearn_facts(item.doc), section=_unlearn_section),
    Kind("eval", "Evaluation", "EVAL.json", accept=lambda f, d: "sets" in d, models=_eval_models,
         section=_eval_section),
    Kind("aggregate", "Aggregated evaluation", "SUMMARY.json",
         accept=lambda f, d: not (f / "EVAL.json").exists() and "truth_ratio_variant" in d, models=_aggregate_models,
         section=_aggregate_section),
    Kind("eco", "ECO artifact", "eco.json", accept=lambda f, d: "tau" in d and (f / "metrics.json").is_file(),
         facts=_eco_facts, section=_eco_section),
]


def describe() -> str:
    """The kinds known and the file each is recognised by, for help texts."""
    return ", ".join(f"{k.title} ({k.signature})" for k in KINDS)
