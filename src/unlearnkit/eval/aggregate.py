"""Headline numbers from per-sample logs: our EVAL.json or the original TOFU codebase's eval logs.

Both become one in-memory layout: {"split": str|None, "source": str, "sets": {set: {field: [per-sample values]}}}
with TOFU's field names (avg_gt_loss = mean token NLL of the answer, avg_paraphrased_loss, average_perturb_loss,
rougeL_recall, ...). `summarize` turns it into SUMMARY.json; every number it cannot compute is null with a reason.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from ..errors import UserError
from . import metrics as M
from .conventions import conventions

SETS = ("forget", "retain", "real_authors", "world_facts")
PREFIX = {"forget": "forget", "retain": "retain", "real_authors": "ra", "world_facts": "wf"}
# Original TOFU file names → our set names (eval_log.json is the retain set).
TOFU_FILES = {"eval_log_forget.json": "forget", "eval_log.json": "retain",
              "eval_real_author_wo_options.json": "real_authors", "eval_real_world_wo_options.json": "world_facts"}
TOFU_AGGREGATED = "eval_log_aggregated.json"
REQUIRED = ("avg_gt_loss", "avg_paraphrased_loss", "average_perturb_loss")
# Optional per-sample numbers: a log made without generation (--no-generate) has no ROUGE; its summary says so.
OPTIONAL = ("rougeL_recall", "rouge1_recall", "avg_gt_prob")
MIA_ATTACKS = ("loss", "zlib", "mink", "minkpp")
PRIVLEAK_CONVENTION_OU = ("open-unlearning (--compat open-unlearning): privleak = ((1 - AUC_model) - (1 - AUC_retain)) "
                          "/ (1 - AUC_retain + 1e-10) * 100 with the same AUC, AUC_retain = 0.5 without a retain "
                          "reference; < 0 under-unlearned, > 0 over-unlearned (the opposite sign of MUSE's)")
PRIVLEAK_CONVENTION = ("MUSE: privleak = (AUC_model - AUC_retain) / AUC_retain * 100, AUC = P(loss-like score of "
                       "holdout > forget); > 0 under-unlearned (forget still looks like training data), "
                       "< 0 over-unlearned")


# ---- loading ------------------------------------------------------------------------------------------------------

def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise UserError(f"{path}: no such file") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable JSON ({str(e).splitlines()[0]})") from e


def _as_list(value, source: str, field: str) -> list:
    """TOFU logs store per-sample values either as {"0": v, "1": v, ...} or as a list."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        try:
            keys = sorted(value, key=int)
        except ValueError as e:
            raise UserError(f"{source}: field {field!r} has non-integer keys (expected sample indices)") from e
        if [int(k) for k in keys] != list(range(len(keys))):
            raise UserError(f"{source}: field {field!r}: sample indices are not 0..{len(keys) - 1}")
        return [value[k] for k in keys]
    raise UserError(f"{source}: field {field!r} must be a list or an index→value object, got {type(value).__name__}")


def _tofu_set(raw: dict, source: str) -> dict:
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a JSON object of per-sample fields")
    out = {}
    for field in REQUIRED + OPTIONAL + ("generated_text",):
        if field in raw:
            out[field] = _as_list(raw[field], source, field)
    if "generated_text" in out:  # TOFU stores [input, generation, ground truth] per sample
        gt = out.pop("generated_text")
        if all(isinstance(g, (list, tuple)) and len(g) >= 3 for g in gt):
            out["question"] = [g[0] for g in gt]
            out["generated_text"] = [g[1] for g in gt]
            out["answer"] = [g[2] for g in gt]
    return out


def load_log(path: str | Path) -> dict:
    """EVAL.json, a TOFU eval_log_aggregated.json, one TOFU eval_log*.json, or a folder of TOFU logs."""
    path = Path(path)
    if path.is_dir():
        if (path / "EVAL.json").is_file():
            return load_log(path / "EVAL.json")
        if (path / TOFU_AGGREGATED).is_file():
            return load_log(path / TOFU_AGGREGATED)
        files = {name: path / f for f, name in TOFU_FILES.items() if (path / f).is_file()}
        if not files:
            raise UserError(f"{path}: no EVAL.json and no TOFU eval logs ({', '.join(TOFU_FILES)})")
        sets = {name: _tofu_set(_read_json(f), str(f)) for name, f in files.items()}
        return _checked({"split": None, "source": str(path), "sets": sets,
                         "files": {name: str(f) for name, f in files.items()}})
    data = _read_json(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    if "sets" in data:  # our EVAL.json
        return _checked({**data, "source": str(path)})
    if any(f in data for f in TOFU_FILES):  # aggregated TOFU log: {file name: per-file log}
        sets = {TOFU_FILES[f]: _tofu_set(data[f], f"{path}[{f}]") for f in TOFU_FILES if f in data}
        return _checked({"split": None, "source": str(path), "sets": sets,
                         "files": {TOFU_FILES[f]: f"{path}[{f}]" for f in TOFU_FILES if f in data}})
    if path.name in TOFU_FILES:
        return _checked({"split": None, "source": str(path), "sets": {TOFU_FILES[path.name]: _tofu_set(data, str(path))}})
    if any(f in data for f in REQUIRED):
        raise UserError(f"{path}: a single TOFU log must be named like {', '.join(TOFU_FILES)} to know its set")
    raise UserError(f"{path}: neither an EVAL.json nor a TOFU eval log (no field {REQUIRED[0]!r})")


def _checked(ev: dict) -> dict:
    """Fields present, equal lengths within a set, finite numbers: else one-line error naming file/field/row."""
    if not isinstance(ev.get("sets"), dict):
        raise UserError(f"{ev['source']}: field 'sets' missing or not an object")
    for name, cols in ev["sets"].items():
        src = ev.get("files", {}).get(name, ev["source"])
        if not isinstance(cols, dict):
            raise UserError(f"{src}: set {name!r} is not an object of per-sample fields")
        required = ("avg_gt_loss",) if name == "holdout" else REQUIRED if name in SETS else ()
        for field in required:
            if field not in cols:
                raise UserError(f"{src}: set {name!r}: field {field!r} missing")
        n = None
        for field, values in cols.items():
            if not isinstance(values, list):
                raise UserError(f"{src}: set {name!r}: field {field!r} is not a list")
            if n is None:
                n, first = len(values), field
            elif len(values) != n:
                raise UserError(f"{src}: set {name!r}: field {field!r} has {len(values)} values but {first!r} "
                                f"has {n}")
            if field in REQUIRED + OPTIONAL or field.startswith(("mia_", "rouge")) or field in ("es", "em"):
                for i, v in enumerate(values):
                    for x in (v if isinstance(v, list) else [v]):
                        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                            raise UserError(f"{src}: set {name!r}: field {field!r} row {i}: {x!r} is not a finite "
                                            f"number")
        if "average_perturb_loss" in cols:
            widths = {len(v) if isinstance(v, list) else -1 for v in cols["average_perturb_loss"]}
            if -1 in widths or 0 in widths or len(widths) > 1:
                raise UserError(f"{src}: set {name!r}: field 'average_perturb_loss' needs a non-empty list of the "
                                f"same length per row")
    return ev


# ---- summary ------------------------------------------------------------------------------------------------------

# Prompt templates the original TOFU code (and forks of it) leave in the logged question (generated_text[i][0]):
# Llama-2 "[INST] q [/INST]", Phi "Question: q\n" (or "Question: q\nAnswer:"), and chat templates that keep the
# special tokens (ChatML, Llama-3, Gemma, Zephyr): the last user turn is the question.
_INST = re.compile(r"^(?:<s>)?\s*\[INST\]\s*(?:<<SYS>>.*?<</SYS>>)?(.*?)\[/INST\]\s*$", re.S)
_QA = re.compile(r"^Question:(.*?)(?:\n\s*Answer:?)?\s*$", re.S)
_CHAT_USER = (re.compile(r"<\|im_start\|>user\s*(.*?)<\|im_end\|>", re.S),
              re.compile(r"<\|start_header_id\|>user<\|end_header_id\|>(.*?)<\|eot_id\|>", re.S),
              re.compile(r"<start_of_turn>user(.*?)<end_of_turn>", re.S),
              re.compile(r"<\|user\|>(.*?)(?:</s>|<\|assistant\|>)", re.S))
# End-of-turn markers some logs keep at the end of the ground-truth answer.
_ANSWER_END = re.compile(r"(?:\s*(?:</s>|<\|im_end\|>|<\|eot_id\|>|<end_of_turn>|<eos>|<\|endoftext\|>))+\s*$")
MATCH_CONVENTION = ("retain log rows are matched to the evaluated model's forget rows by question (after stripping "
                    "known prompt templates and whitespace); failing that by position when row counts and gold "
                    "answers agree; with neither questions nor answers in one log, by row count alone")


def _squash(text: str) -> str:
    return " ".join(str(text).split())


def strip_template(question: str) -> str:
    """The bare question from a logged TOFU input: known prompt templates removed, whitespace collapsed."""
    q = str(question).strip()
    for pattern in _CHAT_USER:
        turns = pattern.findall(q)
        if turns:
            return _squash(turns[-1])
    for pattern in (_INST, _QA):
        m = pattern.match(q)
        if m:
            return _squash(m.group(1))
    return _squash(q)


def _bare_answer(answer: str) -> str:
    a = _ANSWER_END.sub("", str(answer)).strip()
    return _squash(a[len("Answer:"):] if a.startswith("Answer:") else a)


def match_reference(ev: dict, ref: dict) -> str | None:
    """Check that the retain reference is of the same forget set and say how its rows were matched:
    "question" (questions equal once prompt templates and whitespace are stripped), "position" (same row count and
    the same gold answer row by row, questions not comparable), "count" (only the row count could be compared: one
    log has neither questions nor answers). None when either log has no forget set. Else a one-line UserError."""
    if ev.get("split") and ref.get("split") and ev["split"] != ref["split"]:
        raise UserError(f"{ref['source']}: retain log is for split {ref['split']!r}, the evaluated model's log for "
                        f"{ev['split']!r}")
    f, rf = ev["sets"].get("forget"), ref["sets"].get("forget")
    if f is None or rf is None:
        return None
    n, rn = len(f["avg_gt_loss"]), len(rf["avg_gt_loss"])
    if n != rn:
        raise UserError(f"{ref['source']}: retain log has {rn} forget samples, the evaluated model's log has {n} "
                        f"(different split?)")
    if "question" in f and "question" in rf:
        bad = next((i for i, (a, b) in enumerate(zip(f["question"], rf["question"]))
                    if strip_template(a) != strip_template(b)), None)
        if bad is None:
            return "question"
    else:
        bad = None
    if "answer" in f and "answer" in rf:
        wrong = next((i for i, (a, b) in enumerate(zip(f["answer"], rf["answer"]))
                      if _bare_answer(a) != _bare_answer(b)), None)
        if wrong is None:
            return "position"
        also = "" if bad is None else (f"; the questions differ too, first in row {bad}: "
                                       f"{strip_template(rf['question'][bad])[:60]!r}")
        raise UserError(f"{ref['source']}: forget row {wrong} gold answer differs from the evaluated model's log "
                        f"(retain log from another split?): {_bare_answer(rf['answer'][wrong])[:60]!r}{also}")
    if bad is not None:
        raise UserError(f"{ref['source']}: forget row {bad} question differs from the evaluated model's log (retain "
                        f"log from another split?): {_squash(rf['question'][bad])[:60]!r}")
    return "count"


def reference_rows(reference_log: dict | None, rows: list[dict]) -> dict | None:
    """The retain log's forget columns for exactly `rows` (matched by question, templates stripped), in order;
    None when there is no log. A row the log lacks is an error naming it."""
    if reference_log is None:
        return None
    ref = reference_log["sets"].get("forget")
    if ref is None or "question" not in ref:
        raise ValueError(f"{reference_log.get('source', 'retain log')}: no forget questions to match rows by")
    where = {strip_template(q): i for i, q in enumerate(ref["question"])}
    picked = []
    for row in rows:
        i = where.get(strip_template(row["question"]))
        if i is None:
            raise UserError(f"{reference_log.get('source', 'retain log')}: has no forget row for question "
                            f"{row['question'][:60]!r} (retain log of another split?)")
        picked.append(i)
    keep = ("question", "answer", "avg_gt_loss", "avg_paraphrased_loss", "average_perturb_loss")
    return {k: [ref[k][i] for i in picked] for k in keep if k in ref}


def _set_summary(name: str, cols: dict, variant: str, out: dict, why: dict, eps: float = 0.0) -> None:
    p = PREFIX[name]
    forget = name == "forget"
    gt = np.asarray(cols["avg_gt_loss"], float)
    para = np.asarray(cols["avg_paraphrased_loss"], float)
    pert = np.asarray(cols["average_perturb_loss"], float)
    bad = [f for f, a in (("avg_gt_loss", gt), ("avg_paraphrased_loss", para), ("average_perturb_loss", pert))
           if not np.isfinite(a).all()]
    if bad:
        for k in (f"{p}_prob", f"{p}_truth_ratio"):
            out[k], why[k] = None, f"non-finite values in {name}.{bad[0]}"
    else:
        # Probability: plain on forget/retain, normalised over the options on real_authors/world_facts (TOFU).
        out[f"{p}_prob"] = float((M.prob(gt) if name in ("forget", "retain") else
                                  M.normalised_prob(gt, pert, eps)).mean())
        out[f"{p}_truth_ratio"] = M.truth_ratio_score(M.truth_ratio(para, pert, variant, eps), forget, variant, eps)
        for v in M.TRUTH_RATIO_VARIANTS:
            if v != "tofu":
                out[f"{p}_truth_ratio_{v}"] = M.truth_ratio_score(M.truth_ratio(para, pert, v, eps), forget, v, eps)
    for field in ("rougeL_recall", "rouge1_recall", "rougeL_f1", "es", "em"):
        key = f"{p}_{field}"
        if field in cols:
            out[key] = M.finite_mean(cols[field])
            if out[key] is None:
                why[key] = f"non-finite values in {name}.{field}"
        elif field == "rougeL_recall":
            out[key], why[key] = None, f"{name}.rougeL_recall missing"


def _mia(ev: dict) -> dict | None:
    f, h = ev["sets"].get("forget", {}), ev["sets"].get("holdout", {})
    aucs = {}
    for a in MIA_ATTACKS:
        if f"mia_{a}" in f and f"mia_{a}" in h:
            aucs[a] = M.auc(f[f"mia_{a}"], h[f"mia_{a}"])
    return aucs


def summarize(ev: dict, ref: dict | None = None, variant: str = "tofu") -> dict:
    """SUMMARY dict from an EVAL-layout dict and an optional retain-model reference in the same layout."""
    if variant not in M.TRUTH_RATIO_VARIANTS:
        raise UserError(f"--truth-ratio: unknown value {variant!r}; choose one of {', '.join(M.TRUTH_RATIO_VARIANTS)}")
    conv = conventions(log_compat(ev) or "unlearnkit")  # the log's own conventions (eps, PrivLeak formula)
    out: dict = {"split": ev.get("split"), "truth_ratio_variant": variant}
    why: dict = {}
    sets = ev["sets"]
    for name in SETS:
        if name in sets:
            _set_summary(name, sets[name], variant, out, why, conv.eps)
        else:
            for k in ("prob", "truth_ratio", "rougeL_recall"):
                out[f"{PREFIX[name]}_{k}"], why[f"{PREFIX[name]}_{k}"] = None, f"no {name} set in the log"
    # Model utility: harmonic mean of the 9 non-forget numbers.
    parts = [f"{PREFIX[s]}_{k}" for s in ("retain", "real_authors", "world_facts")
             for k in ("prob", "rougeL_recall", "truth_ratio")]
    missing = [k for k in parts if not M.is_finite(out.get(k))]
    out["model_utility"] = None if missing else M.model_utility([out[k] for k in parts])
    if missing:
        why["model_utility"] = f"needs {', '.join(missing)}"
    # Forget quality against the retain model.
    out["forget_quality"] = out["retain_log_match"] = None
    if ref is None:
        why["forget_quality"] = "no retain reference (--retain-model or --retain-log)"
    elif "forget" not in sets or "forget" not in ref["sets"]:
        why["forget_quality"] = "forget set missing in the log or in the retain reference"
    else:
        out["retain_log_match"] = match_reference(ev, ref)
        f, rf = sets["forget"], ref["sets"]["forget"]
        r = M.truth_ratio(f["avg_paraphrased_loss"], f["average_perturb_loss"], variant, conv.eps)
        rr = M.truth_ratio(rf["avg_paraphrased_loss"], rf["average_perturb_loss"], variant, conv.eps)
        if np.isfinite(r).all() and np.isfinite(rr).all():
            out["forget_quality"] = M.forget_quality(r, rr)
        else:
            why["forget_quality"] = "non-finite truth ratios"
    # Membership inference on forget vs holdout (when the log has a holdout set).
    aucs = _mia(ev)
    for a in MIA_ATTACKS:
        out[f"mia_auc_{a}"] = aucs.get(a)
    if ref is not None and "holdout" in sets and "holdout" in ref["sets"] and "forget" in ref["sets"]:
        f, h, rf, rh = sets["forget"], sets["holdout"], ref["sets"]["forget"], ref["sets"]["holdout"]
        if len(rf["avg_gt_loss"]) == len(f["avg_gt_loss"]) and len(rh["avg_gt_loss"]) == len(h["avg_gt_loss"]):
            out["mia_auc_reference"] = M.auc(np.subtract(f["avg_gt_loss"], rf["avg_gt_loss"]),
                                             np.subtract(h["avg_gt_loss"], rh["avg_gt_loss"]))
    out.setdefault("mia_auc_reference", None)
    ref_aucs = _mia(ref) if ref is not None else {}
    for a in MIA_ATTACKS:
        key = f"privleak_{a}"
        ref_auc = ref_aucs.get(a, conv.privleak_default_ref_auc if ref is None else None)
        out[key] = M.privleak(aucs[a], ref_auc, conv.privleak, conv.eps) if a in aucs and ref_auc is not None else None
    out["privleak"] = out["privleak_mink"]  # MUSE reports PrivLeak with Min-K% Prob
    out["privleak_convention"] = PRIVLEAK_CONVENTION if conv.privleak == "muse" else PRIVLEAK_CONVENTION_OU
    if out["retain_log_match"] is None:
        why["retain_log_match"] = why.get("forget_quality") or "no forget set in both logs"
    else:
        out["retain_log_match_convention"] = MATCH_CONVENTION
    es = (ev.get("settings") or {}).get("es_convention")
    if any(f"{PREFIX[n]}_es" in out for n in SETS):
        # Per-sample ES is stored already computed: the convention is whatever the log was written with.
        out["es_convention"] = es or ("unlearnkit" if ev.get("format") else "unknown (not recorded in the log)")
    if not aucs:
        why["mia_auc_loss"] = "no holdout set with MIA scores (TOFU mini has one; pass --holdout otherwise)"
    if out["privleak"] is None:
        why["privleak"] = "needs MIA AUCs of the evaluated model and of the retain reference"
    out["null_reasons"] = why
    return out


def log_compat(ev: dict) -> str | None:
    """The --compat a log was written with: recorded in our EVAL.json; our logs from before it existed used the
    default; None for other logs (TOFU's own), whose conventions are unknown."""
    settings = ev.get("settings") or {}
    return settings.get("compat") or ("unlearnkit" if ev.get("format") else None)


def check_same_conventions(compat: str | None, ref: dict) -> None:
    """Forget quality and PrivLeak compare two logs' numbers: both must come from the same conventions."""
    theirs = log_compat(ref)
    if compat and theirs and compat != theirs:
        raise UserError(f"{ref.get('source', 'retain reference')}: evaluated with --compat {theirs}, the model with "
                        f"--compat {compat}; evaluate both the same way")


def aggregate(path, retain_log=None, variant: str = "tofu") -> dict:
    ev = load_log(path)
    ref = load_log(retain_log) if retain_log else None
    if ref is not None:
        check_same_conventions(log_compat(ev), ref)
        match_reference(ev, ref)  # fail before any summary work
    return summarize(ev, ref, variant)
