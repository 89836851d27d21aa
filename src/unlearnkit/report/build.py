"""Assemble the report: the runs' provenance, the results table, the comparison figures over every evaluated model,
then one section per folder (kinds.py), written as report.html (self-contained) and report.md with its PNGs."""
from __future__ import annotations

import re
import time
from pathlib import Path

from ..errors import UserError
from .collect import Item, ModelResult, common_folder
from .render import Figure, Note, Para, Section, Table, seconds, to_html, to_markdown

ROLES = ("retain", "target")
NULL_KEYS = ("forget_quality", "model_utility", "privleak", "mia_auc_loss")


class Context:
    """What a section needs: a figure maker (numbered PNGs in the report folder), the models and their references,
    and cached per-sample logs."""

    def __init__(self, folder: Path, models: list[ModelResult]):
        self.folder, self.models, self.n, self._logs = folder, models, 0, {}
        self.current = ""  # the folder whose section is being built: its name goes into its figures' file names

    def figure(self, stem: str, title: str, caption: str, draw) -> Figure:
        self.n += 1
        name = re.sub(r"[^a-z0-9]+", "-", f"{stem} {self.current}".lower()).strip("-")[:60]
        file = f"fig{self.n:02d}-{name}.png"
        draw(self.folder / file)
        path = self.folder / file
        if not path.is_file() or path.stat().st_size == 0:
            raise RuntimeError(f"figure {file} was not written")  # a bug, not bad input: never list a blank figure
        return Figure(file, title, caption, self.n)

    def references(self, item: Item | None, role: str | None = None) -> list[ModelResult]:
        """The retain model and target an item is compared with: its own (a demo's, an `eval tofu --retain-model`
        folder's) or else the first given anywhere (--retain-log / --target-log first)."""
        out = []
        for r in (role,) if role else ROLES:
            own = [m for m in self.models if m.role == r and item is not None and m.source == item.label]
            anywhere = [m for m in self.models if m.role == r]
            if own or anywhere:
                out.append((own or anywhere)[0])
        return out

    def log(self, path):
        from ..eval.aggregate import load_log

        key = str(path)
        if key not in self._logs:
            self._logs[key] = load_log(path)
        return self._logs[key]


def reference_model(path, role: str) -> ModelResult:
    """A retain / target model given by its log (--retain-log / --target-log): EVAL.json or TOFU logs."""
    from ..eval.aggregate import load_log, summarize

    log = load_log(path)
    summary = log.get("summary") if isinstance(log.get("summary"), dict) else summarize(log)
    return ModelResult(role, role, summary, f"--{role}-log {path}", Path(path))


def collect_models(items: list[Item], extra: list[ModelResult]) -> list[ModelResult]:
    models = list(extra)
    for item in items:
        models += item.kind.models(item)
    counts: dict = {}
    for m in models:
        counts[m.name] = counts.get(m.name, 0) + 1
    for m in models:  # e.g. two demos: "retain" twice
        if counts[m.name] > 1 and m.source and not m.name.startswith(m.source):
            m.name = f"{m.source}: {m.name}"
    colour = 0
    for m in models:
        if m.role == "model" and m.group is None:
            m.colour, colour = colour, colour + 1
    return models


# ---- provenance --------------------------------------------------------------------------------------------------

def _versions(v) -> str:
    if not isinstance(v, dict) or not v:
        return "—"
    return ", ".join(f"{k} {v[k]}" for k in ("unlearnkit", "torch", "transformers", "python") if k in v)


def facts(item: Item) -> dict:
    own = item.kind.facts(item)
    m = item.marker
    # The marker's command is the one the CLI parsed (run.json's is the process's argv: a launcher's, under pytest)
    return {"command": m.get("command") or own.get("command"), "versions": m.get("versions") or own.get("versions"),
            "seed": own.get("seed"), "seconds": own.get("seconds") if own.get("seconds") is not None
            else m.get("seconds"), "written": m.get("written")}


def inputs_section(items: list[Item]) -> Section:
    rows, missing = [], []
    for item in items:
        f = facts(item)
        if not f["command"]:
            missing.append(item.label)
        rows.append([item.label, item.kind.title, f["command"] or "not recorded", _versions(f["versions"]),
                     "—" if f["seed"] is None else str(f["seed"]), seconds(f["seconds"]),
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(f["written"])) if f["written"] else "—"])
    blocks = [Table(["folder", "kind", "command", "versions", "seed", "wall time", "written"], rows,
                    "What each folder is and what produced it")]
    if missing:
        blocks.append(Note(f"No command recorded for {', '.join(missing)}: written by a command or an unlearnkit "
                           "version that does not record it (the folder's .unlearnkit.json has no 'command'), or "
                           "through the Python API."))
    return Section("Runs", blocks, "runs")


# ---- comparison over every evaluated model -----------------------------------------------------------------------

def results_section(models: list[ModelResult]) -> Section:
    from ..eval.tofu import TABLE_KEYS

    if not models:
        return Section("Results", [Note("No TOFU evaluation among the folders given (an `eval tofu`, `eval "
                                        "aggregate`, sweep or demo folder), so there is no results table.")],
                       "results")
    keys = [k for k in TABLE_KEYS if any(k in m.summary for m in models)]
    rows = [["role"] + [m.role for m in models]]
    if any(m.name != m.source for m in models):
        rows.append(["folder"] + [m.source for m in models])
    rows += [[k] + [m.summary.get(k) for m in models] for k in keys]
    blocks = [Para("Headline numbers (SUMMARY.json) of every evaluated model; ra = real authors, wf = world facts, "
                   "es / em = extraction strength / exact memorisation, privleak = MUSE's PrivLeak (Min-K% Prob, "
                   "in %, 0 = like the retain model). — marks a number the run did not compute; why is listed "
                   "below."),
              Table(["metric"] + [m.name for m in models], rows, "Results")]
    why = []
    for m in models:
        reasons = m.summary.get("null_reasons") or {}
        got = [f"{k}: {reasons[k]}" for k in NULL_KEYS if k in reasons and m.summary.get(k) is None]
        if m.role == "retain" and m.summary.get("forget_quality") is None:
            got = [g for g in got if not g.startswith("forget_quality")] + [
                "forget_quality: it is the reference (1 by definition)"]
        if got:
            why.append(f"{m.name} — " + "; ".join(got))
    if why:
        blocks += [Note("Not computed: " + " | ".join(why))]
    return Section("Results", blocks, "results")


def fq_mu_section(ctx: Context, models: list[ModelResult], sweeps: list) -> Section:
    from .figures import finite, fq_mu, fq_mu_figure

    drawn, left = [], []
    for m in models:
        fq, mu = fq_mu(m)
        if finite(fq) and fq > 0 and finite(mu) or (m.role in ROLES and (finite(fq) or finite(mu))):
            drawn.append(m)
        else:
            reasons = m.summary.get("null_reasons") or {}
            why = [reasons.get(k) or f"{k} is {v}" for k, v in (("forget_quality", fq), ("model_utility", mu))
                   if not (finite(v) and (k != "forget_quality" or v > 0))]
            left.append(f"{m.name} ({'; '.join(str(w) for w in why)})")
    points = [r for _, rows, _ in sweeps for r in rows]
    blocks = []
    if [m for m in drawn if m.role == "model"] or points:
        blocks.append(ctx.figure("forget-quality-vs-utility", "Forget quality against model utility",
                                 "Each evaluated model (log forget quality: the KS p-value of its forget truth ratios "
                                 "against the retain model's); sweeps as their Pareto frontiers; the retain model "
                                 "(forget quality 1 by definition) and the target as reference points or lines.",
                                 lambda p: fq_mu_figure(drawn, sweeps, p)))
    else:
        blocks.append(Note("No model has both forget quality and model utility, so there is no forget-quality / "
                           "utility figure."))
    if left:
        blocks.append(Note("Not drawn: " + "; ".join(left) + "."))
    return Section("Forget quality vs model utility", blocks, "fq-mu")


def truth_ratio_section(ctx: Context, models: list[ModelResult]) -> Section:
    from ..eval.aggregate import match_reference
    from .figures import truth_ratio_figure, truth_ratios

    pairs, left, variant = [], [], "tofu"
    for m in models:
        if m.role == "retain":
            continue
        ref = m.reference
        if m.eval_path is None:
            left.append(f"{m.name}: no per-sample log (EVAL.json)")
            continue
        if ref is None or ref.eval_path is None:
            left.append(f"{m.name}: no retain reference with per-sample values (give --retain-log EVAL.json)")
            continue
        ev, rv = ctx.log(m.eval_path), ctx.log(ref.eval_path)
        if "forget" not in ev["sets"] or "forget" not in rv["sets"]:
            left.append(f"{m.name}: no forget set in its log or the retain model's")
            continue
        try:
            match_reference(ev, rv)
        except UserError as e:
            left.append(f"{m.name}: the retain reference does not match ({e})")
            continue
        variant = (ev.get("settings") or {}).get("truth_ratio") or "tofu"
        pairs.append((m, truth_ratios(ev["sets"]["forget"], variant), truth_ratios(rv["sets"]["forget"], variant)))
    blocks = [Para("Forget quality is the p-value of a two-sample Kolmogorov–Smirnov test between a model's truth "
                   "ratios on the forget QA and the retain model's. R = mean probability of the perturbed (wrong) "
                   "answers / probability of the paraphrased answer; a model that never learned the forget authors "
                   "has the retain model's distribution.")]
    if pairs:
        blocks.append(ctx.figure("truth-ratios", "Truth ratios on the forget set against the retain model",
                                 "Histogram per model (line) over the retain model's (grey); D = the KS statistic "
                                 "(largest gap between the two cumulative distributions), p = forget quality.",
                                 lambda p: truth_ratio_figure(pairs, p, variant)))
    else:
        blocks.append(Note("No truth-ratio histogram: it needs a model's per-sample EVAL.json and the retain model's "
                           "(a demo folder, `eval tofu --retain-model`, or `report --retain-log`)."))
    if left:
        blocks.append(Note("Not drawn: " + "; ".join(left) + "."))
    return Section("Truth ratios against the retain model", blocks, "truth-ratios")


def set_bars_section(ctx: Context, models: list[ModelResult]) -> Section:
    from .figures import SET_PANELS, SET_PREFIXES, finite, set_bars_figure

    keys = [f"{p}_{k}" for p, _ in SET_PREFIXES for k, _ in SET_PANELS]
    shown = [m for m in models if any(finite(m.summary.get(k)) for k in keys)]
    if not shown:
        return Section("Per-set metrics", [Note("No model has per-set probabilities, ROUGE-L or truth ratios.")],
                       "per-set")
    blocks = [ctx.figure("per-set-metrics", "Probability, ROUGE-L and truth ratio per evaluation set",
                         "Forget: lower means more forgotten; the other sets: higher means more kept. Probability: "
                         "p(a|q) on forget / retain, normalised over the answer options on real authors / world "
                         "facts; ROUGE-L recall of the greedy answer against the gold one; truth ratio score: mean "
                         "min(R, 1/R) on forget, mean max(0, 1 − R) elsewhere. The retain model and the target "
                         "hatched grey; n/a = not computed (e.g. no generation, or a set not evaluated).",
                         lambda p: set_bars_figure(shown, p))]
    return Section("Per-set metrics", blocks, "per-set")


def mia_section(ctx: Context, models: list[ModelResult]) -> Section:
    from .figures import MIA_ATTACKS, mia_roc_figure, roc

    curves, left = [], []
    for m in models:
        if m.eval_path is None:
            left.append(f"{m.name}: no per-sample log")
            continue
        sets = ctx.log(m.eval_path)["sets"]
        f, h = sets.get("forget") or {}, sets.get("holdout") or {}
        per = {a: roc(f[f"mia_{a}"], h[f"mia_{a}"]) for a, _ in MIA_ATTACKS if f"mia_{a}" in f and f"mia_{a}" in h}
        if per:
            curves.append((m, per))
        else:
            left.append(f"{m.name}: no holdout set with membership scores")
    blocks = [Para("Membership inference: can a score tell the forget QA (trained on, then unlearned) from holdout QA "
                   "(never trained on)? AUC 0.5 = no; the retain model is the honest baseline.")]
    if curves:
        blocks.append(ctx.figure("mia-roc", "Membership-inference ROC curves, forget vs holdout",
                                 "One panel per score (lower loss-like score = called a member); AUC in the legend, "
                                 "as in SUMMARY.json (mia_auc_*).", lambda p: mia_roc_figure(curves, p)))
    else:
        blocks.append(Note("No ROC curve: no model has per-sample membership scores on forget and holdout sets."))
    if left:
        blocks.append(Note("Not drawn: " + "; ".join(left) + "."))
    return Section("Membership inference", blocks, "mia")


# ---- the whole report --------------------------------------------------------------------------------------------

def build(items: list[Item], folder: Path, extra_models=()) -> tuple[list[Section], Context]:
    models = collect_models(items, list(extra_models))
    ctx = Context(folder, models)
    by_label = {i.label: i for i in items}
    for m in models:
        if m.role != "retain":
            refs = ctx.references(by_label.get(m.source), "retain")
            m.reference = refs[0] if refs else None
    compared = [m for m in models if m.group is None]
    sweeps = [(i.label, i.doc.get("points") or [], i.doc.get("pareto") or []) for i in items if i.kind.name == "sweep"]
    sections = [inputs_section(items), results_section(compared)]
    if compared or sweeps:
        sections += [fq_mu_section(ctx, compared, sweeps), truth_ratio_section(ctx, compared),
                     set_bars_section(ctx, compared), mia_section(ctx, compared)]
    for n, item in enumerate(items, 1):
        ctx.current = Path(item.label).name
        blocks = item.kind.section(item, ctx) if item.kind.section else []
        sections.append(Section(f"{item.kind.title}: {item.label}", blocks, f"item-{n}"))
    return sections, ctx


def write_report(items: list[Item], folder, *, title: str | None = None, retain_log=None, target_log=None,
                 labelled: bool = False) -> Path:
    """Write report.html, report.md and the figures into `folder` (an existing, empty folder); returns the HTML.
    labelled: the items carry names given by the caller (not paths below a common folder)."""
    from .. import __version__

    folder = Path(folder)
    extra = [reference_model(p, role) for p, role in ((retain_log, "retain"), (target_log, "target")) if p]
    sections, ctx = build(items, folder, extra)
    title = title or "unlearnkit report"
    base = common_folder(items)
    where = (f" in {base}" if base else f": {items[0].path.resolve()}") if items and not labelled else ""
    meta = [f"Generated {time.strftime('%Y-%m-%d %H:%M')} by unlearnkit {__version__} from {len(items)} folder"
            f"{'s' if len(items) != 1 else ''}{where}; {ctx.n} figure{'s' if ctx.n != 1 else ''}."]
    (folder / "report.html").write_text(to_html(title, meta, sections, folder), encoding="utf-8")
    (folder / "report.md").write_text(to_markdown(title, meta, sections), encoding="utf-8")
    return folder / "report.html"

