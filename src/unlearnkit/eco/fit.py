"""Fit an ECO artifact: classifier + threshold, token selection, corruption strength; write it atomically."""
from __future__ import annotations

import random
import sys
import time
from pathlib import Path

from ..data.format import PromptFormat
from ..errors import UserError
from .classifier import fit_classifier, jailbreak_wrap
from .corrupt import NOISE_METHODS, CorruptionConfig
from .entities import extract_entities
from ..files import check_out_dir
from .guard import ARTIFACT_KIND, EcoGuard, embedding_width
from .search import embedding_scale, forget_metric, grid_search, zo_search

MAX_PER_SOURCE = 1000  # negatives per source: enough for a 1% conformal threshold, bounded encoding time


def tofu_prompt_sets(split: str, seed: int = 0) -> tuple[list[dict], dict[str, list[str]]]:
    """TOFU forget rows and negative prompts by source. `retain` = questions about every author that is not a
    forget author (a bigger, harder negative set than the split's retain evaluation rows)."""
    from ..data import tofu

    task = tofu.task(split)
    forget_authors = {r.get("author") for r in task.forget}
    others = [r["question"] for r in tofu.load("full") if r["author"] not in forget_authors]
    return task.forget, {"retain": _cap(others, seed), "real_authors": [r["question"] for r in task.real_authors],
                         "world_facts": [r["question"] for r in task.world_facts]}


def _cap(items: list[str], seed: int, n: int = MAX_PER_SOURCE) -> list[str]:
    if len(items) <= n:
        return items
    return random.Random(seed).sample(items, n)


def read_prompts(path: str | Path, field: str = "question") -> list[str]:
    """Prompts from a .txt file (one per line) or JSON/JSONL/CSV rows with a `field` column."""
    from ..data.qa import read_records

    path = Path(path)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise UserError(f"{path}: no such file")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        prompts = []
        for i, rec in enumerate(read_records(path)):
            value = rec.get(field) if isinstance(rec, dict) else None
            if not isinstance(value, str) or not value.strip():
                raise UserError(f"{path}: row {i}: field {field!r} missing or empty")
            prompts.append(value)
    if not prompts:
        raise UserError(f"{path}: no prompts (empty file)")
    return prompts


def fit_eco(out_dir, *, model, tokenizer, forget: list[dict], negatives: dict[str, list[str]],
            mode: str = "entity", entities: list[str] | None = None, corruption: CorruptionConfig | None = None,
            target_fpr: float = 0.01, search: str = "zo", metric: str = "prob", target_value: float | None = None,
            reference_model=None, search_options: dict | None = None, fmt: PromptFormat = PromptFormat(),
            seed: int = 0, device: str = "cpu", metadata: dict | None = None, log=print) -> Path:
    """Fit and save an ECO artifact for `model` (used only for the sigma search; never modified).

    forget: rows with "question" (+ "answer" for the search; "paraphrased_question", "paraphrased_answer",
    "perturbed_answer" where available). target_value or reference_model (the retain model) gives v_target.
    """
    corruption = corruption or CorruptionConfig(seed=seed)
    check_out_dir(out_dir, ARTIFACT_KIND)
    corruption.check_width(embedding_width(model))  # before any fitting
    questions = [r["question"] for r in forget]
    paraphrased = [r["paraphrased_question"] for r in forget if r.get("paraphrased_question")]
    eval_pos = {"forget_paraphrased": paraphrased, "forget_jailbreak": jailbreak_wrap(questions),
                "forget_paraphrased_jailbreak": jailbreak_wrap(paraphrased)}
    eval_pos = {k: v for k, v in eval_pos.items() if v}
    t0 = time.perf_counter()
    log(f"[eco] classifier: {len(questions)} forget prompts, "
        + ", ".join(f"{k} {len(v)}" for k, v in negatives.items()) + " negatives")
    clf, metrics = fit_classifier(questions, negatives, target_fpr=target_fpr, eval_positives=eval_pos, seed=seed,
                                  device=device)
    metrics["classifier_seconds"] = time.perf_counter() - t0
    log(f"[eco] tau={clf.tau:.4f}  FNR " + "  ".join(f"{k}={v:.3f}" for k, v in metrics["fnr"].items())
        + "  | FPR " + "  ".join(f"{k}={v:.3f}" for k, v in metrics["fpr"].items() if v is not None))
    if target_fpr < metrics["achievable_fpr"]:
        log(f"[eco] warning: {metrics['n_calibration']} calibration negatives certify FPR >= "
            f"{metrics['achievable_fpr']:.3f} only, not {target_fpr}; give more negatives")

    if entities is None:
        neg_texts = [t for v in negatives.values() for t in v]
        entities = extract_entities(questions + [r.get("answer", "") for r in forget], neg_texts)
    log(f"[eco] mode={mode}; entities: {', '.join(entities) if entities else '(none)'}")

    search_result = {}
    if search != "none":
        if corruption.method not in NOISE_METHODS:
            raise UserError(f"--search {search}: only the noise corruptions ({', '.join(NOISE_METHODS)}) have a "
                            f"strength to search; use --search none with {corruption.method}")
        search_result = search_sigma(model, tokenizer, forget, corruption, mode, entities, search=search,
                                     metric=metric, target_value=target_value, reference_model=reference_model,
                                     fmt=fmt, options=search_options or {}, log=log)
        corruption = CorruptionConfig(corruption.method, search_result["sigma"], corruption.dims, corruption.seed)
        metrics["search"] = {k: search_result[k] for k in ("method", "metric", "target", "target_source", "sigma",
                                                            "value", "objective", "value_unguarded")}
    guard = EcoGuard(model, tokenizer, clf, corruption, mode, entities, fmt, metadata)
    return guard.save(out_dir, metrics=metrics, search=search_result)


def search_sigma(model, tokenizer, forget, corruption: CorruptionConfig, mode, entities, *, search="zo",
                 metric="prob", target_value=None, reference_model=None, fmt=PromptFormat(), options=None,
                 log=print) -> dict:
    """Run the zeroth-order (or grid) search of sigma on the forget rows. Returns the search record."""
    options = dict(options or {})
    if metric == "prob":
        need = ("answer",)
    else:
        need = ("paraphrased_answer", "perturbed_answer")
    for i, row in enumerate(forget):
        for f in need:
            if not row.get(f):
                raise UserError(f"forget set: row {row.get('index', i)}: field {f!r} missing (needed by --metric "
                                f"{metric}); use --metric prob or --search none --sigma S")
    if target_value is None:
        if reference_model is None:
            raise UserError("--search: needs --target-value V or --reference-model DIR (the retain model)")
        ref_v = forget_metric(reference_model, tokenizer, forget, metric=metric, fmt=fmt)(None)
        target_value, source = ref_v, "reference_model"
    else:
        source = "given"
    factory = lambda s: EcoGuard(model, tokenizer, None, CorruptionConfig(corruption.method, s, corruption.dims,
                                                                          corruption.seed), mode, entities, fmt)
    v = forget_metric(model, tokenizer, forget, metric=metric, fmt=fmt, guard_factory=factory)
    unguarded = v(None)
    scale = embedding_scale(model)
    log(f"[eco] search ({search}, metric {metric}): unguarded {unguarded:.4f}, target {target_value:.4f} "
        f"({source}); sigma unit = embedding std {scale:.4g}")
    show = lambda e: log("[eco]   " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                               for k, v in e.items()))
    if search == "zo":
        res = zo_search(v, target_value, scale=scale, log=show, **options)
    elif search == "grid":
        res = grid_search(v, target_value, scale=scale, log=show, **options)
    else:
        raise UserError(f"--search: unknown value {search!r}; choose zo, grid or none")
    res.update(metric=metric, target_source=source, value_unguarded=unguarded, scale=scale)
    log(f"[eco] sigma = {res['sigma']:.4g} ({res['sigma'] / scale:.3g} x embedding std), value {res['value']:.4f}")
    return res


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
