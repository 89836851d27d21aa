"""MUSE (Shi et al., 2024): VerbMem, KnowMem and (when the privleak texts are present) MIA AUCs, on data in MUSE's
published layout (github.com/swj0419/muse_bench `data/{news,books}/`, or the HF dataset exported to files):

  verbmem/forget.json          [{"prompt", "gt"}]          continuation of forget passages
  knowmem/forget_qa.json       [{"question", "answer"}]    and retain_qa.json, plus *_icl.json few-shot examples
  privleak/{forget,holdout}.json   ["text", ...] or [{"text"}]   (optional; retain.json ignored)

VerbMem = ROUGE-L F1 of a greedy 128-token continuation vs gt. KnowMem = ROUGE-L F1 of a greedy answer (32 tokens)
after the few-shot context "Question: q\nAnswer: a\n\n...", stopped at "\n\n" or "\nQuestion". Plain text, no chat
template (MUSE's models are base models)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..data.format import encode_text
from ..errors import UserError
from . import metrics as M
from .generate import greedy_generate
from .limits import at_least, check_generation, context_length
from .logprobs import sequence_stats

KNOWMEM_STOPS = ("\n\n", "\nQuestion")


def _read_list(path: Path, fields: tuple[str, ...]) -> list:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable JSON ({str(e).splitlines()[0]})") from e
    if not isinstance(data, list) or not data:
        raise UserError(f"{path}: expected a non-empty JSON list")
    out = []
    for i, row in enumerate(data):
        if not fields:  # plain texts
            text = row.get("text") if isinstance(row, dict) else row
            if not isinstance(text, str) or not text.strip():
                raise UserError(f"{path}: row {i}: expected a text (or an object with field 'text')")
            out.append(text)
            continue
        if not isinstance(row, dict):
            raise UserError(f"{path}: row {i} is not an object")
        for f in fields:
            if not isinstance(row.get(f), str) or not row[f].strip():
                raise UserError(f"{path}: row {i}: field {f!r} missing or empty")
        out.append({f: row[f] for f in fields})
    return out


def load_muse(folder, limit: int | None = None) -> dict:
    """Whatever of MUSE's evaluation files the folder holds; at least one of verbmem / knowmem."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"--data {root}: no such folder")
    at_least(limit, 1, "limit", none_ok=True)
    data = {}
    cut = (lambda xs: xs[:limit]) if limit else (lambda xs: xs)
    if (root / "verbmem" / "forget.json").is_file():
        data["verbmem"] = cut(_read_list(root / "verbmem" / "forget.json", ("prompt", "gt")))
    for split in ("forget", "retain"):
        qa = root / "knowmem" / f"{split}_qa.json"
        if qa.is_file():
            data[f"knowmem_{split}"] = cut(_read_list(qa, ("question", "answer")))
            icl = root / "knowmem" / f"{split}_qa_icl.json"
            data[f"knowmem_{split}_icl"] = _read_list(icl, ("question", "answer")) if icl.is_file() else []
    if (root / "privleak" / "forget.json").is_file() and (root / "privleak" / "holdout.json").is_file():
        data["privleak_forget"] = cut(_read_list(root / "privleak" / "forget.json", ()))
        data["privleak_holdout"] = cut(_read_list(root / "privleak" / "holdout.json", ()))
    if not any(k in data for k in ("verbmem", "knowmem_forget", "knowmem_retain")):
        raise UserError(f"--data {root}: no MUSE files (verbmem/forget.json or knowmem/forget_qa.json)")
    return data


def knowmem_prompt(icl: list[dict], question: str) -> str:
    shots = "".join(f"Question: {ex['question']}\nAnswer: {ex['answer']}\n\n" for ex in icl)
    return shots + f"Question: {question}\nAnswer:"


def check_options(*, batch_size, verbmem_tokens, knowmem_tokens, verbmem_prompt_tokens=None,
                  max_text_tokens=2048) -> None:
    """Ranges of evaluate_muse's numeric options (also run by the CLI before loading anything)."""
    at_least(batch_size, 1, "batch_size")
    at_least(verbmem_tokens, 1, "verbmem_tokens (--max-new-tokens-verbmem)")
    at_least(knowmem_tokens, 1, "knowmem_tokens (--max-new-tokens-knowmem)")
    at_least(verbmem_prompt_tokens, 1, "verbmem_prompt_tokens (--verbmem-prompt-tokens)", none_ok=True)
    at_least(max_text_tokens, 2, "keyword max_text_tokens")


def _prompt_ids(tokenizer, data: dict, verbmem_prompt_tokens: int | None) -> dict:
    """Token ids of every generation prompt: {"verbmem" | "knowmem_forget" | "knowmem_retain": (texts, ids)}."""
    enc = lambda text: tokenizer(text, add_special_tokens=True)["input_ids"]
    out = {}
    if "verbmem" in data:
        ids = [enc(r["prompt"]) for r in data["verbmem"]]
        if verbmem_prompt_tokens:
            ids = [x[-verbmem_prompt_tokens:] for x in ids]
        out["verbmem"] = ([tokenizer.decode(x) for x in ids], ids)
    for split in ("forget", "retain"):
        key = f"knowmem_{split}"
        if key in data:
            texts = [knowmem_prompt(data[f"{key}_icl"], r["question"]) for r in data[key]]
            out[key] = (texts, [enc(t) for t in texts])
    return out


def _check_prompts(prompts: dict, *, verbmem_tokens: int, knowmem_tokens: int, context: int | None) -> None:
    files = {"verbmem": "verbmem/forget.json", "knowmem_forget": "knowmem/forget_qa.json",
             "knowmem_retain": "knowmem/retain_qa.json"}
    for key, (_, ids) in prompts.items():
        verb = key == "verbmem"
        check_generation([len(x) for x in ids], lambda i: f"{files[key]} row {i}",
                         max_new_tokens=verbmem_tokens if verb else knowmem_tokens, context=context,
                         option="--max-new-tokens-verbmem" if verb else "--max-new-tokens-knowmem")


def check_lengths(tokenizer, data: dict, *, verbmem_tokens: int = 128, knowmem_tokens: int = 32,
                  verbmem_prompt_tokens: int | None = None, context: int | None = None) -> None:
    """Before loading weights: every prompt + its new tokens fits the model's context (error names file and row)."""
    _check_prompts(_prompt_ids(tokenizer, data, verbmem_prompt_tokens), verbmem_tokens=verbmem_tokens,
                   knowmem_tokens=knowmem_tokens, context=context)


def evaluate_muse(model, tokenizer, data: dict, *, guard=None, retain_reference=None, batch_size: int = 32,
                  progress: bool = True, verbmem_tokens: int = 128, knowmem_tokens: int = 32,
                  verbmem_prompt_tokens: int | None = None, max_text_tokens: int = 2048) -> dict:
    """EVAL dict: per-sample generations and scores, "summary" with verbmem_rougeL_f1, knowmem_{forget,retain}_
    rougeL_f1 and, with privleak texts, mia_auc_* (forget vs holdout) and privleak vs retain_reference (the retain
    model's MUSE EVAL dict, or a path to its EVAL.json). Privleak texts are cut to max_text_tokens (and to the model's
    context). A prompt + new tokens beyond the model's context is an error naming file and row."""
    from tqdm.auto import tqdm

    check_options(batch_size=batch_size, verbmem_tokens=verbmem_tokens, knowmem_tokens=knowmem_tokens,
                  verbmem_prompt_tokens=verbmem_prompt_tokens, max_text_tokens=max_text_tokens)
    ref = reference_summary(retain_reference)  # unreadable reference: fail before the work
    context = context_length(getattr(model, "config", None))
    prompts = _prompt_ids(tokenizer, data, verbmem_prompt_tokens)
    _check_prompts(prompts, verbmem_tokens=verbmem_tokens, knowmem_tokens=knowmem_tokens, context=context)
    total = sum(len(ids) for _, ids in prompts.values()) + sum(
        len(data.get(f"privleak_{n}", ())) for n in ("forget", "holdout") if "privleak_forget" in data)
    bar = tqdm(total=total, desc="eval muse", disable=not progress)
    sets, summary, why = {}, {}, {}
    gen = dict(batch_size=batch_size, guard=guard, progress=bar)
    if "verbmem" in data:
        rows = data["verbmem"]
        texts, ids = prompts["verbmem"]
        outs = greedy_generate(model, tokenizer, ids, max_new_tokens=verbmem_tokens, prompts=texts, **gen)
        scores = [M.rouge(r["gt"], o) for r, o in zip(rows, outs)]
        sets["verbmem"] = {"prompt": [r["prompt"] for r in rows], "gt": [r["gt"] for r in rows],
                           "generated_text": outs, **{k: [s[k] for s in scores] for k in scores[0]}}
        summary["verbmem_rougeL_f1"] = float(np.mean(sets["verbmem"]["rougeL_f1"]))
    else:
        summary["verbmem_rougeL_f1"], why["verbmem_rougeL_f1"] = None, "no verbmem/forget.json"
    for split in ("forget", "retain"):
        key = f"knowmem_{split}"
        if key not in data:
            summary[f"{key}_rougeL_f1"], why[f"{key}_rougeL_f1"] = None, f"no knowmem/{split}_qa.json"
            continue
        rows = data[key]
        texts, ids = prompts[key]
        outs = greedy_generate(model, tokenizer, ids, max_new_tokens=knowmem_tokens, stop_strings=KNOWMEM_STOPS,
                               prompts=texts, **gen)
        scores = [M.rouge(r["answer"], o) for r, o in zip(rows, outs)]
        sets[key] = {"question": [r["question"] for r in rows], "answer": [r["answer"] for r in rows],
                     "generated_text": outs, **{k: [s[k] for s in scores] for k in scores[0]}}
        summary[f"{key}_rougeL_f1"] = float(np.mean(sets[key]["rougeL_f1"]))
        summary[f"{key}_rougeL_recall"] = float(np.mean(sets[key]["rougeL_recall"]))
    if "privleak_forget" in data:
        keep = min(max_text_tokens, context) if context else max_text_tokens
        for name in ("forget", "holdout"):
            texts = data[f"privleak_{name}"]
            exs = []
            for t in texts:
                ex = encode_text(tokenizer, t)
                exs.append({k: v[:keep] for k, v in ex.items()})
            st = sequence_stats(model, exs, batch_size=max(1, batch_size // 4), pad_id=tokenizer.pad_token_id,
                                want_dist=[True] * len(exs), prompts=texts, guard=guard, progress=bar)
            sets[f"privleak_{name}"] = {
                "mia_loss": [M.mia_loss(s.logp) for s in st],
                "mia_zlib": [M.mia_zlib(s.logp, t) for s, t in zip(st, texts)],
                "mia_mink": [M.mia_mink(s.logp) for s in st],
                "mia_minkpp": [M.mia_minkpp(s.logp, s.mu, s.var) for s in st]}
        for a in ("loss", "zlib", "mink", "minkpp"):
            summary[f"mia_auc_{a}"] = M.auc(sets["privleak_forget"][f"mia_{a}"], sets["privleak_holdout"][f"mia_{a}"])
        for a in ("loss", "zlib", "mink", "minkpp"):
            r = ref.get(f"mia_auc_{a}")
            summary[f"privleak_{a}"] = M.privleak(summary[f"mia_auc_{a}"], r) if M.is_finite(r) else None
        summary["privleak"] = summary["privleak_mink"]
        if summary["privleak"] is None:
            why["privleak"] = ("needs the retain model's MUSE EVAL (retain_reference) with mia_auc_mink" if not ref
                               else "the retain reference has no finite mia_auc_mink (not a MUSE EVAL with privleak "
                                    "texts?)")
    else:
        why["mia_auc_mink"] = "no privleak/forget.json + privleak/holdout.json"
        if ref:
            why["privleak"] = "no privleak/forget.json + privleak/holdout.json: the retain reference was not used"
    bar.close()
    from .aggregate import PRIVLEAK_CONVENTION

    summary["privleak_convention"] = PRIVLEAK_CONVENTION
    summary["null_reasons"] = why
    return {"format": "unlearnkit-eval-muse/1", "settings": {"verbmem_tokens": verbmem_tokens,
            "knowmem_tokens": knowmem_tokens, "verbmem_prompt_tokens": verbmem_prompt_tokens,
            "batch_size": batch_size, "guard": guard is not None}, "sets": sets, "summary": summary}


def reference_summary(ref) -> dict:
    """The summary of a retain model's MUSE EVAL (dict, EVAL.json or its folder); {} for None."""
    if ref is None:
        return {}
    if isinstance(ref, (str, Path)):
        p = Path(ref)
        p = p / "EVAL.json" if p.is_dir() else p
        try:
            ref = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"--retain-log {p}: not a readable MUSE EVAL.json ({str(e).splitlines()[0]})") from e
        if not isinstance(ref, dict):
            raise UserError(f"--retain-log {p}: expected a JSON object (a MUSE EVAL.json)")
    if not isinstance(ref, dict):
        raise UserError("retain_reference: expected a MUSE EVAL dict or a path to its EVAL.json")
    summary = ref.get("summary", ref)
    return summary if isinstance(summary, dict) else {}
