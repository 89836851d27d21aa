"""TOFU evaluation: every teacher-forced number from one pooled, length-sorted pass over all (question, answer)
sequences of all sets, plus one pooled batched greedy generation. Per-sample values use TOFU's field names so
EVAL.json doubles as a TOFU-style log (eval aggregate / forget-quality reference)."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from ..data import tofu as tofu_data
from ..data.format import PromptFormat
from ..errors import UserError
from ..files import write_json_atomic
from . import metrics as M
from .aggregate import SETS, check_same_conventions, load_log, match_reference, summarize
from .conventions import UNLEARNKIT, Conventions, conventions, resolve_es_convention
from .generate import generation_batch_size, greedy_generate
from .limits import GEN_MEMORY_GB, at_least, check_generation, check_memory_gb, check_sequences, context_length
from .logprobs import sequence_stats

FORMAT = "unlearnkit-eval/1"
ROLE_NAMES = {"gt": "answer", "para": "paraphrased answer"}


def eval_sequences(sets: dict[str, list[dict]]):
    """All (set, row, role, question, answer) to score. role: gt | para | pert j. real_authors/world_facts have no
    paraphrase: their truth ratio uses the original answer (TOFU), i.e. the gt sequence."""
    for name, rows in sets.items():
        for i, row in enumerate(rows):
            yield name, i, "gt", row["question"], row["answer"]
            if name == "holdout":
                continue
            if name in ("forget", "retain"):
                yield name, i, "para", row["question"], row["paraphrased_answer"]
            for j, pert in enumerate(row["perturbed_answer"]):
                yield name, i, ("pert", j), row["question"], pert


def _check_rows(sets: dict[str, list[dict]]) -> None:
    for name, rows in sets.items():
        need = ("question", "answer") + (() if name == "holdout" else ("perturbed_answer",)) + (
            ("paraphrased_answer",) if name in ("forget", "retain") else ())
        for i, row in enumerate(rows):
            for f in need:
                if not row.get(f):
                    raise UserError(f"TOFU {name} set: row {row.get('index', i)}: field {f!r} missing or empty")
            if name != "holdout" and not isinstance(row["perturbed_answer"], list):
                raise UserError(f"TOFU {name} set: row {row.get('index', i)}: 'perturbed_answer' is not a list")


def task_sets(data, holdout: list[dict] | None = None, only_sets: tuple[str, ...] | None = None):
    """(task, {set name: rows}) for a TofuTask or split name, with the holdout set (default: the task's own) and
    only the sets asked for; rows checked."""
    task = tofu_data.task(data) if isinstance(data, str) else data
    sets = dict(task.eval_sets())
    holdout = task.holdout if holdout is None else holdout
    if holdout:
        sets["holdout"] = holdout
    if only_sets is not None:
        unknown = set(only_sets) - set(sets)
        if unknown:
            raise UserError(f"only_sets: unknown or empty set(s) {sorted(unknown)}; available: {sorted(sets)}")
        sets = {name: rows for name, rows in sets.items() if name in only_sets}
    _check_rows(sets)
    return task, sets


_ENCODED: list = []   # (key, tokenizer, encoded) of recent evaluations, newest last
_ENCODED_KEEP = 4


def _encode(tokenizer, sets, fmt, generate: bool, conv: Conventions = UNLEARNKIT):
    """Token ids of every teacher-forced sequence and of every generation prompt (the one tokenisation).

    The sets do not depend on the model, so evaluations in one process (sweeps, attacks, the demo's models) that
    use the same tokenizer object, format, conventions and rows reuse the last few tokenisations (seconds each for
    forget01). Callers get fresh outer lists; the token lists inside are shared and never modified."""
    key = (fmt, conv, generate, hashlib.sha1(json.dumps(sets, sort_keys=True, default=str).encode()).hexdigest())
    for k, tok, encoded in _ENCODED:
        if k == key and tok is tokenizer:
            return tuple(list(x) for x in encoded)
    encoded = _encode_now(tokenizer, sets, fmt, generate, conv)
    _ENCODED.append((key, tokenizer, encoded))
    del _ENCODED[:-_ENCODED_KEEP]
    return tuple(list(x) for x in encoded)


def _encode_now(tokenizer, sets, fmt, generate: bool, conv: Conventions):
    seqs = list(eval_sequences(sets))
    examples = [conv.encode_qa(tokenizer, q, a, fmt) for _, _, _, q, a in seqs]
    gen_rows = [(name, i) for name in SETS if name in sets for i in range(len(sets[name]))] if generate else []
    gen_ids = [conv.encode_prompt(tokenizer, sets[n][i]["question"], fmt) for n, i in gen_rows]
    return seqs, examples, gen_rows, gen_ids


def _check_encoded(sets, seqs, examples, gen_rows, gen_ids, *, max_length, max_new_tokens, context) -> None:
    def row(name, i):
        return f"TOFU {name} set row {sets[name][i].get('index', i)}"

    def seq(k):
        name, i, role, _, _ = seqs[k]
        return f"{row(name, i)} ({ROLE_NAMES.get(role) or f'perturbed answer {role[1]}'})"

    check_sequences([len(e["input_ids"]) for e in examples], seq, max_length=max_length, context=context,
                    what="question + answer")
    check_generation([len(x) for x in gen_ids], lambda k: row(*gen_rows[k]), max_new_tokens=max_new_tokens,
                     context=context)


def check_lengths(tokenizer, sets: dict, fmt: PromptFormat = PromptFormat(), *, max_length: int | None = None,
                  max_new_tokens: int | None = None, context: int | None = None, compat=None) -> None:
    """Before loading weights: every question + answer fits max_length and the context, and (when generating,
    max_new_tokens given) every prompt + max_new_tokens fits the context. One-line error naming set and row.
    compat: the conventions the sequences are rendered with (conventions.py)."""
    seqs, examples, gen_rows, gen_ids = _encode(tokenizer, sets, fmt, max_new_tokens is not None,
                                                conventions(compat))
    _check_encoded(sets, seqs, examples, gen_rows, gen_ids, max_length=max_length, max_new_tokens=max_new_tokens or 0,
                   context=context)


def _load_reference(retain_reference):
    if retain_reference is None:
        return None
    if isinstance(retain_reference, dict):
        if "sets" not in retain_reference:
            raise UserError("retain_reference: expected an EVAL dict (with 'sets')")
        return {"source": "retain_reference", **retain_reference}
    return load_log(retain_reference)


def check_options(*, batch_size, max_new_tokens=None, max_length=None, truth_ratio="tofu",
                  es_convention=None, compat=None, gen_batch_size=None,
                  gen_memory_gb=GEN_MEMORY_GB) -> tuple[Conventions, str]:
    """Ranges and choices of evaluate_tofu's options (also run by the CLI before loading anything).
    Returns the conventions and the ES convention to use (es_convention None: the conventions' own)."""
    at_least(batch_size, 1, "batch_size")
    at_least(gen_batch_size, 1, "gen_batch_size", none_ok=True)
    check_memory_gb(gen_memory_gb)
    at_least(max_new_tokens, 1, "max_new_tokens", none_ok=True)
    at_least(max_length, 2, "max_length", none_ok=True)
    if truth_ratio not in M.TRUTH_RATIO_VARIANTS:
        raise UserError(f"--truth-ratio: unknown value {truth_ratio!r}; choose one of "
                        f"{', '.join(M.TRUTH_RATIO_VARIANTS)}")
    if es_convention is not None and es_convention not in M.ES_CONVENTIONS:
        raise UserError(f"--es-convention: unknown value {es_convention!r}; choose one of "
                        f"{', '.join(M.ES_CONVENTIONS)}")
    conv = conventions(compat)
    if conv.pinned and truth_ratio != "tofu":
        raise UserError(f"--truth-ratio {truth_ratio} conflicts with --compat {conv.name}, whose headline truth "
                        "ratio is the tofu one (every variant is reported anyway)")
    return conv, resolve_es_convention(conv, es_convention)


def evaluate_tofu(model, tokenizer, data, *, guard=None, retain_reference=None, batch_size: int = 32,
                  progress: bool = True, fmt: PromptFormat = PromptFormat(), max_new_tokens: int = 200,
                  max_length: int | None = None, holdout: list[dict] | None = None, truth_ratio: str = "tofu",
                  es_convention: str | None = None, generate: bool = True,
                  only_sets: tuple[str, ...] | None = None, compat: str | Conventions | None = None,
                  timings: dict | None = None, gen_batch_size: int | None = None,
                  gen_memory_gb: float = GEN_MEMORY_GB) -> dict:
    """Evaluate one model on a TOFU split. Returns the EVAL dict (per-sample values + "summary").

    data: a TofuTask or a split name. retain_reference: the retain model's EVAL dict or a path to its EVAL.json /
    TOFU logs (for forget quality, Reference MIA and PrivLeak). holdout: QA rows never trained on (MIA); default the
    task's holdout (mini has one). generate=False skips generation (ROUGE becomes null). max_length: longest
    question + answer allowed (None: the model's context only); a longer one, or a prompt + max_new_tokens beyond
    the model's context, is an error naming set and row. es_convention: "unlearnkit" (a missed last token gives
    ES 0) or "open-unlearning" (1/L there), see metrics.extraction_strength; None: the one of `compat`.
    compat: "unlearnkit" (default) or "open-unlearning" — render, label, attend, decode and aggregate as
    open-unlearning's TOFU evaluation does (conventions.py; recorded in settings.compat). timings: a dict that
    receives teacher_forced_seconds and generation_seconds. batch_size: teacher-forced batches;
    gen_batch_size: rows decoded at once (None: as many as fit gen_memory_gb GiB, generate.generation_batch_size;
    recorded in settings.gen_batch_size).
    """
    from tqdm.auto import tqdm

    conv, es_convention = check_options(batch_size=batch_size, max_new_tokens=max_new_tokens, max_length=max_length,
                                        truth_ratio=truth_ratio, es_convention=es_convention, compat=compat,
                                        gen_batch_size=gen_batch_size, gen_memory_gb=gen_memory_gb)
    task, sets = task_sets(data, holdout, only_sets)
    ref = _load_reference(retain_reference)
    if ref is not None:
        check_same_conventions(conv.name, ref)
    if ref is not None and "forget" in sets:  # a reference of another forget set fails now, not after the work
        rows = sets["forget"]
        match_reference({"split": task.split, "sets": {"forget": {
            "avg_gt_loss": [0.0] * len(rows), "question": [r["question"] for r in rows],
            "answer": [r["answer"] for r in rows]}}}, ref)

    seqs, examples, gen_rows, gen_ids = _encode(tokenizer, sets, fmt, generate, conv)
    _check_encoded(sets, seqs, examples, gen_rows, gen_ids, max_length=max_length, max_new_tokens=max_new_tokens,
                   context=context_length(getattr(model, "config", None)))
    prompts = [conv.prompt_text(tokenizer, q, fmt) for _, _, _, q, _ in seqs]
    want = [role == "gt" and name in ("forget", "holdout") for name, _, role, _, _ in seqs]
    hidden = conv.hidden_token(tokenizer)
    bar = tqdm(total=len(seqs) + len(gen_rows), desc=f"eval tofu {task.split}", disable=not progress)
    clock = _Clock(model, timings)
    stats = sequence_stats(model, examples, batch_size=batch_size, pad_id=tokenizer.pad_token_id,
                           want_dist=want, prompts=prompts, guard=guard, progress=bar, hidden_token=hidden)
    clock.lap("teacher_forced_seconds")
    gens = []
    if generate:
        gen_batch_size = gen_batch_size or generation_batch_size(
            getattr(model, "config", None), [len(x) for x in gen_ids], max_new_tokens, gen_memory_gb,
            next(model.parameters()).element_size())
        gen_prompts = [conv.prompt_text(tokenizer, sets[n][i]["question"], fmt) for n, i in gen_rows]
        gens = greedy_generate(model, tokenizer, gen_ids, max_new_tokens=max_new_tokens, batch_size=gen_batch_size,
                               prompts=gen_prompts, guard=guard, progress=bar, hidden_token=hidden,
                               decode=lambda ids: conv.decode(tokenizer, ids))
    clock.lap("generation_seconds")
    bar.close()

    cols = {name: _columns(name, rows) for name, rows in sets.items()}
    gt_example = {}
    for (name, i, role, _, answer), st, ex in zip(seqs, stats, examples):
        c = cols[name]
        if role == "gt":
            gt_example[name, i] = ex
            c["avg_gt_loss"][i] = st.nll
            c["num_token_gt"][i] = len(st.logp)
            logp, match = conv.scored(st.logp), conv.scored(st.match)  # the tokens ES, EM and Min-K% look at
            if name != "holdout":
                c["es"][i] = M.extraction_strength(match, es_convention)
                c["em"][i] = M.exact_memorisation(match)
                if name in ("real_authors", "world_facts"):
                    c["avg_paraphrased_loss"][i] = st.nll
            if st.mu is not None:
                c["mia_loss"][i] = M.mia_loss(st.logp)
                c["mia_zlib"][i] = M.mia_zlib(st.logp, conv.zlib_text(tokenizer, answer, ex))
                c["mia_mink"][i] = M.mia_mink(logp)
                c["mia_minkpp"][i] = M.mia_minkpp(logp, conv.scored(st.mu), conv.scored(st.var),
                                                  var_floor=conv.minkpp_var_floor)
        elif role == "para":
            c["avg_paraphrased_loss"][i] = st.nll
        else:
            c["average_perturb_loss"][i][role[1]] = st.nll
    for (name, i), ids, text in zip(gen_rows, gen_ids, gens):
        c = cols[name]
        c["generated_text"][i] = text
        gold = conv.gold_text(tokenizer, c["answer"][i], gt_example[name, i], ids)
        for k, v in M.rouge(gold, text).items():
            c[k][i] = v
    if not generate:
        for name in (n for n in SETS if n in cols):
            for k in ("generated_text", "rougeL_recall", "rouge1_recall", "rougeL_f1"):
                cols[name].pop(k)

    ev = {"format": FORMAT, "split": task.split, "source": "evaluate_tofu",
          "prompt_format": {"kind": fmt.kind, "system_prompt": fmt.system_prompt},
          "settings": {"max_new_tokens": max_new_tokens if generate else None, "max_length": max_length,
                       "batch_size": batch_size, "gen_batch_size": gen_batch_size if generate else None,
                       "guard": guard is not None, "mink_k": M.MINK_K,
                       "truth_ratio": truth_ratio, "es_convention": es_convention, "compat": conv.name},
          "sets": cols}
    ev["summary"] = summarize(ev, ref, truth_ratio)  # without generation: ROUGE and utility null, with reason
    ev.pop("source")
    return ev


class _Clock:
    """Wall time between laps into `timings` (nothing when None); waits for the GPU so a lap holds its own work."""

    def __init__(self, model, timings: dict | None):
        import torch

        self.timings = timings
        cuda = timings is not None and next(model.parameters()).device.type == "cuda"
        self.sync = torch.cuda.synchronize if cuda else (lambda: None)
        self.t = time.perf_counter()

    def lap(self, key: str) -> None:
        if self.timings is not None:
            self.sync()
            now = time.perf_counter()
            self.timings[key] = now - self.t
            self.t = now


def limit_task(task, n: int | None):
    """The first n rows of every evaluation set (quick runs); n None/0 → unchanged."""
    import dataclasses

    at_least(n, 0, "limit", none_ok=True)
    if not n:
        return task
    return dataclasses.replace(task, forget=task.forget[:n], retain_eval=task.retain_eval[:n],
                               real_authors=task.real_authors[:n], world_facts=task.world_facts[:n],
                               holdout=task.holdout[:n])


def _columns(name: str, rows: list[dict]) -> dict:
    n = len(rows)
    c = {"index": [r.get("index", i) for i, r in enumerate(rows)], "question": [r["question"] for r in rows],
         "answer": [r["answer"] for r in rows], "avg_gt_loss": [None] * n, "num_token_gt": [None] * n}
    if name == "holdout":
        return {**c, **{f"mia_{a}": [None] * n for a in ("loss", "zlib", "mink", "minkpp")}}
    c.update({"avg_paraphrased_loss": [None] * n,
              "average_perturb_loss": [[None] * len(r["perturbed_answer"]) for r in rows],
              "generated_text": [None] * n, "rougeL_recall": [None] * n, "rouge1_recall": [None] * n,
              "rougeL_f1": [None] * n, "es": [None] * n, "em": [None] * n})
    if name == "forget":
        c.update({f"mia_{a}": [None] * n for a in ("loss", "zlib", "mink", "minkpp")})
    return c


# ---- output -------------------------------------------------------------------------------------------------------

def write_eval(out_dir, eval_dict: dict) -> Path:
    """Write EVAL.json (everything) and SUMMARY.json (headline numbers) into out_dir, each atomically.
    (The eval CLI writes into a fresh temporary folder and publishes it whole: see eval/cli.py.)"""
    out = Path(out_dir)
    write_json_atomic(out / "EVAL.json", eval_dict)
    write_json_atomic(out / "SUMMARY.json", eval_dict.get("summary", {}))
    return out


TABLE_KEYS = ("model_utility", "forget_quality", "forget_rougeL_recall", "forget_truth_ratio", "forget_prob",
              "retain_rougeL_recall", "retain_truth_ratio", "retain_prob", "ra_rougeL_recall", "ra_truth_ratio",
              "ra_prob", "wf_rougeL_recall", "wf_truth_ratio", "wf_prob", "forget_es", "forget_em",
              "mia_auc_mink", "privleak")


def summary_table(rows: dict[str, dict], keys=TABLE_KEYS) -> str:
    """Metrics down, models across; '-' where a value is null (the summary's null_reasons say why)."""
    names = list(rows)
    keys = [k for k in keys if any(k in s for s in rows.values())]
    width = max([len(k) for k in keys] + [6])
    colw = [max(10, len(n)) for n in names]
    fmt = lambda v: "-" if not M.is_finite(v) else f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    lines = [f"{'metric':<{width}}  " + "  ".join(f"{n:>{w}}" for n, w in zip(names, colw))]
    for k in keys:
        lines.append(f"{k:<{width}}  " + "  ".join(f"{fmt(rows[n].get(k)):>{w}}" for n, w in zip(names, colw)))
    return "\n".join(lines)
