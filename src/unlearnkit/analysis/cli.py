"""`unlearnkit analyze ...`: analyses that explain how unlearning methods behave.

Subcommands: markov (SimNPO's synthetic Markov-chain study), confidence (token confidence before / after),
difficulty (SimNPO's strongly / weakly memorised and short / long forget data), alignment
(RMU's steering coefficient against the layer's activation norm), layers (one run per method and layer, beside the
layer's activation norm). Each analysis adds its parser in `add_commands` below
(one `_add_NAME(asub)` call each) and checks every option before any work starts; a command that writes a folder
writes it aside and publishes it whole (files.py rules)."""
from __future__ import annotations

import sys
from pathlib import Path

from ..errors import UserError
from ..files import check_out_dir, write_folder, write_json_atomic

KIND = {"markov": "analyze markov", "confidence": "analyze confidence", "difficulty": "analyze difficulty",
        "alignment": "analyze alignment", "layers": "analyze layers"}


def add_commands(sub) -> None:
    p = sub.add_parser("analyze", help="analyses: why unlearning methods behave as they do (markov, confidence, difficulty, alignment, layers)")
    asub = p.add_subparsers(dest="analyze_command", metavar="ANALYSIS", required=True)
    _add_markov(asub)
    _add_confidence(asub)
    _add_difficulty(asub)
    _add_alignment(asub)
    _add_layers(asub)
    # Further analyses register here, one _add_NAME(asub) each.


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _add_markov(asub) -> None:
    from .markov import MarkovSettings

    d = MarkovSettings()
    m = asub.add_parser("markov", help="SimNPO's synthetic study: NPO vs SimNPO unlearning a mixture of Markov "
                        "chains on a small GPT-2 (CPU, minutes); writes MARKOV.json and MARKOV.png",
                        description="Pretrain a small GPT-2 on retain + forget1 Markov chains (forget2 unseen) and a "
                        "retain-only reference, unlearn forget1 + forget2 with NPO and SimNPO, and track the "
                        "per-token KL to the retain-only model on the retain, forget1 and forget2 test sets after "
                        "every step. Variant A: forget2 sequences as long as the others; B: short forget2.")
    m.add_argument("--out", required=True, help="folder for MARKOV.json and MARKOV.png: new, empty, or an earlier "
                   "`analyze markov` output (replaced)")
    m.add_argument("--variants", type=_csv, default=d.variants, metavar="A,B",
                   help="A: forget2 length = --length; B: forget2 length = --short-length (default: A,B)")
    m.add_argument("--methods", type=_csv, default=d.methods, metavar="npo,simnpo", help="default: npo,simnpo")
    m.add_argument("--steps", type=int, default=d.steps, help=f"unlearning steps (default {d.steps})")
    m.add_argument("--seed", type=int, default=d.seed, help=f"data, initialisation and order seed (default {d.seed})")
    size = m.add_argument_group("sizes (defaults: the paper's setting)")
    size.add_argument("--n-retain", type=int, default=d.n_retain, help=f"retain sequences (default {d.n_retain})")
    size.add_argument("--n-forget", type=int, default=d.n_forget,
                      help=f"forget1 and forget2 sequences, each (default {d.n_forget})")
    size.add_argument("--length", type=int, default=d.length, help=f"sequence length (default {d.length})")
    size.add_argument("--short-length", type=int, default=d.short_length,
                      help=f"forget2 length in variant B (default {d.short_length})")
    size.add_argument("--test-fraction", type=float, default=d.test_fraction,
                      help=f"test share of each set (default {d.test_fraction})")
    size.add_argument("--n-layer", type=int, default=d.n_layer, help=f"default {d.n_layer}")
    size.add_argument("--n-head", type=int, default=d.n_head, help=f"default {d.n_head}")
    size.add_argument("--n-embd", type=int, default=d.n_embd, help=f"model width (default {d.n_embd})")
    size.add_argument("--pretrain-epochs", type=float, default=d.pretrain_epochs,
                      help=f"default {d.pretrain_epochs:g}")
    size.add_argument("--pretrain-batch-size", type=int, default=d.pretrain_batch_size,
                      help=f"default {d.pretrain_batch_size}")
    size.add_argument("--pretrain-lr", type=float, default=d.pretrain_lr, help=f"default {d.pretrain_lr:g}")
    size.add_argument("--lr", type=float, default=d.lr, help=f"unlearning learning rate (default {d.lr:g})")
    size.add_argument("--batch-size", type=int, default=d.batch_size,
                      help=f"unlearning batch size (default {d.batch_size})")
    size.add_argument("--beta", type=float, default=d.beta, help=f"NPO and SimNPO beta (default {d.beta:g})")
    size.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, help="sequences per evaluation "
                      "forward pass (memory only; default %(default)s)")
    m.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    m.add_argument("--quiet", action="store_true", help="no progress bars or stage messages")
    m.set_defaults(func=run_markov_cmd)


def run_markov_cmd(args) -> int:
    from .markov import MarkovSettings

    names = ("variants", "methods", "steps", "seed", "n_retain", "n_forget", "length", "short_length",
             "test_fraction", "n_layer", "n_head", "n_embd", "pretrain_epochs", "pretrain_batch_size", "pretrain_lr",
             "lr", "batch_size", "beta", "eval_batch_size")
    settings = MarkovSettings(**{k: getattr(args, k) for k in names})
    if args.threads is not None and (isinstance(args.threads, bool) or args.threads < 1):
        raise UserError(f"--threads {args.threads}: must be an integer of at least 1")
    out = check_out_dir(args.out, KIND["markov"])

    import torch

    from .markov import plot, run_markov, summary_lines

    if args.threads:
        torch.set_num_threads(args.threads)
    say = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    result = {}

    def write(tmp: Path) -> None:
        result.update(run_markov(settings, progress=not args.quiet, log=say))
        write_json_atomic(tmp / "MARKOV.json", result)
        plot(result, tmp / "MARKOV.png")

    from ..train.loop import NonFiniteLoss

    try:
        write_folder(out, KIND["markov"], write)
    except NonFiniteLoss as e:  # e.g. a learning rate too high for this model: say so in one line, write nothing
        what = str(e).split("; stopped")[0]  # the loop's advice about checkpoints does not apply here
        raise UserError(f"{what}; stopped, nothing written. Try a lower --lr or --pretrain-lr") from e
    print("\n".join(summary_lines(result)))
    print(f"wrote {out / 'MARKOV.json'} and {out / 'MARKOV.png'} ({result['seconds']:.0f} s)")
    return 0


def _add_confidence(asub) -> None:
    from ..cli_common import add_format_args

    c = asub.add_parser("confidence", help="mean max-softmax probability and entropy of next-token distributions "
                        "on forget / retain / general QA, per model (before vs after unlearning)")
    c.add_argument("--model", action="append", default=[], metavar="[NAME=]DIR", help="model folder (repeatable)")
    c.add_argument("--split", default="mini", choices=["mini", "forget01", "forget05", "forget10"])
    c.add_argument("--controls", default="target,retain", help="also measure the split's prepared models: "
                   "target (before unlearning), retain, both (default) or none")
    c.add_argument("--base-model", default=None, help="base model of the prepared controls (default: SmolLM2)")
    c.add_argument("--limit", type=int, default=None, help="first N rows of each set only")
    c.add_argument("--batch-size", type=int, default=16)
    add_format_args(c)
    c.add_argument("--dtype", default=None)
    c.add_argument("--device", default=None)
    c.add_argument("--out", required=True, help="folder for CONFIDENCE.json and CONFIDENCE.png")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=run_confidence_cmd)


def run_confidence_cmd(args) -> int:
    from ..attacks.subjects import Subject, named, unique_names
    from ..cli_common import check_model_args, prompt_format
    from ..data import tofu
    from ..eval.limits import at_least
    from ..eval.tofu import limit_task
    from ..models import load_model, resolve_model_path
    from .confidence import confidence_figure, confidence_sets, summary_table, token_confidence

    at_least(args.limit, 1, "--limit", none_ok=True)
    at_least(args.batch_size, 1, "--batch-size")
    check_model_args(args, "base_model")
    controls = [] if args.controls.strip() == "none" else [c.strip() for c in args.controls.split(",") if c.strip()]
    if any(c not in ("target", "retain") for c in controls):
        raise UserError(f"--controls: unknown value {args.controls!r}; choose target,retain, target, retain or none")
    subjects = [Subject(n, resolve_model_path(p, option="--model")) for n, p in map(named, args.model)]
    if not subjects and not controls:
        raise UserError("nothing to measure: give --model DIR and/or --controls")
    out = check_out_dir(args.out, KIND["confidence"], inputs=[s.model for s in subjects if Path(s.model).exists()])
    fmt = prompt_format(args)
    sets = confidence_sets(limit_task(tofu.task(args.split), args.limit))
    if controls:
        from ..prepare import prepare_tofu

        paths = prepare_tofu(args.split, args.base_model, fmt=fmt, max_length=args.max_length, dtype=args.dtype,
                             device=args.device, progress=not args.quiet)
        subjects = [Subject(c, str(paths[c]), role=c) for c in controls] + subjects
    subjects = unique_names(subjects)
    results = {}
    for s in subjects:
        model, tokenizer = load_model(s.model, dtype=args.dtype, device=args.device)
        results[s.name] = {name: token_confidence(model, tokenizer, rows, fmt=fmt, batch_size=args.batch_size,
                                                  max_length=args.max_length) for name, rows in sets.items()}
        del model
    doc = {"split": args.split, "sets": {k: len(v) for k, v in sets.items()},
           "subjects": {s.name: s.describe() for s in subjects},
           "summary": {n: {k: {m: v[m] for m in ("max_prob", "entropy", "tokens")} for k, v in per.items()}
                       for n, per in results.items()}, "per_row": results}

    def write(tmp: Path) -> None:
        write_json_atomic(tmp / "CONFIDENCE.json", doc)
        confidence_figure(results, {s.name: s.role for s in subjects}, tmp / "CONFIDENCE.png",
                          title=f"Token confidence on {args.split} (teacher-forced gold answers)")

    write_folder(out, KIND["confidence"], write)
    print(summary_table(results))
    print(f"wrote {out / 'CONFIDENCE.json'} and {out / 'CONFIDENCE.png'}")
    return 0


def _add_prepared_args(p, name: str, batch_size: int) -> None:
    """Options of the analyses that start from a split's prepared target and retain models."""
    from ..cli_common import add_format_args

    p.add_argument("--split", default="mini", choices=["mini", "forget01", "forget05", "forget10"])
    p.add_argument("--model", default=None, help="base model of the prepared target / retain (default: SmolLM2)")
    add_format_args(p)
    p.add_argument("--batch-size", type=int, default=batch_size, help="evaluation batch size")
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True, help=f"folder for {name}.json and {name}.png")
    p.add_argument("--quiet", action="store_true")


def _prepared_with_retain(args, fmt, task, score=None):
    """(prepared paths, the retain model's reference, forget_columns keyword arguments). The reference is
    score(retain model, tokenizer) when given, else the retain model's teacher-forced forget columns."""
    from ..models import load_model
    from ..prepare import prepare_tofu
    from .difficulty import forget_columns

    paths = prepare_tofu(args.split, args.model, fmt=fmt, max_length=args.max_length, dtype=args.dtype,
                         device=args.device, progress=not args.quiet)
    kw = dict(fmt=fmt, batch_size=args.batch_size)
    retain_model, tokenizer = load_model(str(paths["retain"]), dtype=args.dtype, device=args.device)
    if score is not None:
        return paths, score(retain_model, tokenizer), kw
    return paths, forget_columns(retain_model, tokenizer, task.forget, **kw), kw


def _add_difficulty(asub) -> None:
    d = asub.add_parser("difficulty", help="forget quality of each method on strongly vs weakly memorised and short "
                        "vs long forget QA, at matched budgets (SimNPO's TOFU panel)")
    d.add_argument("--methods", type=_csv, default=("npo", "simnpo"), metavar="npo,simnpo")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to every method (the matched budget), e.g. --set epochs=4")
    _add_prepared_args(d, "DIFFICULTY", batch_size=32)
    d.set_defaults(func=run_difficulty_cmd)


def run_difficulty_cmd(args) -> int:
    from ..cli_common import check_model_args, prompt_format
    from ..data import tofu
    from ..eval.limits import at_least
    from ..methods.cli import parse_sets
    from ..models import load_model
    from ..unlearning import resolve_config, unlearn
    from .difficulty import SUBSETS, difficulty_figure, forget_columns, split_rows, subset_summaries

    at_least(args.batch_size, 1, "--batch-size")
    check_model_args(args)
    if not args.methods:
        raise UserError("--methods: give at least one method")

    config = parse_sets(args.set)
    for m in args.methods:
        resolve_config(m, config)  # unknown method or bad value: an error before any work
    out = check_out_dir(args.out, KIND["difficulty"], inputs=[args.model] if args.model and Path(args.model).exists()
                        else [])
    fmt = prompt_format(args)
    task = tofu.task(args.split)
    paths, retain_cols, kw = _prepared_with_retain(args, fmt, task)
    results, runs = {}, {}
    target_cols = subsets = None
    for method in args.methods:
        model, tokenizer = load_model(str(paths["target"]), dtype=args.dtype, device=args.device)
        if subsets is None:
            target_cols = forget_columns(model, tokenizer, task.forget, **kw)
            subsets = split_rows(target_cols, task.forget, tokenizer, fmt)
            results["target"] = subset_summaries(target_cols, retain_cols, subsets, args.split)
        info = unlearn(model, tokenizer, method, task.forget, task.retain_train_for_unlearning, config, fmt=fmt,
                       progress=not args.quiet)
        model = info.pop("model")
        runs[method] = {"steps": len(info["steps"]), "config": info["config"], "train_seconds": info["train_seconds"]}
        results[method] = subset_summaries(forget_columns(model, tokenizer, task.forget, **kw), retain_cols, subsets,
                                           args.split)
        del model
    doc = {"split": args.split, "methods": list(args.methods), "fixed": config, "runs": runs,
           "subsets": {k: v for k, v in subsets.items()}, "summary": results}

    def write(tmp: Path) -> None:
        write_json_atomic(tmp / "DIFFICULTY.json", doc)
        difficulty_figure({k: v for k, v in results.items()}, tmp / "DIFFICULTY.png",
                          title=f"Forget quality per forget subset — {args.split}")

    write_folder(out, KIND["difficulty"], write)
    print(f"{'model':<12} " + " ".join(f"{s:>10}" for s in ("all",) + SUBSETS) + "   (forget quality)")
    for name, per in results.items():
        fq = [per[s].get("forget_quality") for s in ("all",) + SUBSETS]
        print(f"{name:<12} " + " ".join(f"{'-' if v is None else f'{v:.3g}':>10}" for v in fq))
    print(f"wrote {out / 'DIFFICULTY.json'} and {out / 'DIFFICULTY.png'}")
    return 0


def _add_alignment(asub) -> None:
    a = asub.add_parser("alignment", help="short RMU runs per steering coefficient c: cosine between forget "
                        "activations at layer l and u, their norm, forget metrics, against c / ||h_l||")
    a.add_argument("--layer", type=int, default=7)
    a.add_argument("--coefficients", type=_csv, required=True, metavar="C1,C2,...")
    a.add_argument("--steps", type=int, default=50, help="RMU steps per coefficient")
    a.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="other RMU config overrides")
    _add_prepared_args(a, "ALIGNMENT", batch_size=16)
    a.set_defaults(func=run_alignment_cmd)


def run_alignment_cmd(args) -> int:
    from ..cli_common import check_model_args, prompt_format
    from ..data import tofu
    from ..eval.limits import at_least
    from ..methods.cli import parse_sets
    from ..models import load_model
    from ..unlearning import resolve_config, unlearn
    from .alignment import alignment_figure, layer_alignment, steering_direction
    from .difficulty import forget_columns
    from ..attacks.score import summarize_forget

    at_least(args.steps, 1, "--steps")
    at_least(args.batch_size, 1, "--batch-size")
    check_model_args(args)
    try:
        coefficients = [float(c) for c in args.coefficients]
    except ValueError:
        raise UserError(f"--coefficients: not a list of numbers: {','.join(args.coefficients)!r}") from None
    if not coefficients or any(not c > 0 for c in coefficients):
        raise UserError(f"--coefficients: give numbers > 0 (got {','.join(args.coefficients)!r})")
    base = {**parse_sets(args.set), "layer": args.layer, "max_steps": args.steps}
    configs = [resolve_config("rmu", {**base, "steering_coeff": c}) for c in coefficients]  # all checked now
    out = check_out_dir(args.out, KIND["alignment"], inputs=[args.model] if args.model and Path(args.model).exists()
                        else [])
    fmt = prompt_format(args)
    task = tofu.task(args.split)
    paths, retain_cols, kw = _prepared_with_retain(args, fmt, task)

    def measure(model) -> dict:
        u = steering_direction(model, configs[0]["seed"])
        stats = layer_alignment(model, tokenizer, task.forget, args.layer, u, fmt=fmt, batch_size=args.batch_size,
                                max_length=args.max_length)
        return {**stats, **summarize_forget(forget_columns(model, tokenizer, task.forget, **kw), retain_cols,
                                            args.split)}

    target, tokenizer = load_model(str(paths["target"]), dtype=args.dtype, device=args.device)
    before = measure(target)
    points = []
    for c, cfg in zip(coefficients, configs):
        model, _ = load_model(str(paths["target"]), dtype=args.dtype, device=args.device)
        info = unlearn(model, tokenizer, "rmu", task.forget, task.retain_train_for_unlearning,
                       {k: cfg[k] for k in base} | {"steering_coeff": c}, fmt=fmt, progress=not args.quiet)
        points.append({"c": c, "c_over_norm": c / before["norm"], "steps": len(info["steps"]),
                       **measure(info.pop("model"))})
    doc = {"split": args.split, "layer": args.layer, "fixed": base, "target": before, "points": points}

    def write(tmp: Path) -> None:
        write_json_atomic(tmp / "ALIGNMENT.json", doc)
        alignment_figure(points, before, tmp / "ALIGNMENT.png",
                         title=f"RMU at layer {args.layer}: alignment with u against c / ||h_l||")

    write_folder(out, KIND["alignment"], write)
    print(f"target: mean ||h_{args.layer}|| {before['norm']:.1f}, cos(h, u) {before['cosine']:.3f}, "
          f"forget p {before['forget_prob']:.3f}")
    for p in points:
        fq = "-" if p["forget_quality"] is None else f"{p['forget_quality']:.3g}"
        print(f"c {p['c']:>8g}  c/||h|| {p['c_over_norm']:>7.2f}  cos {p['cosine']:.3f}  ||h|| {p['norm']:8.1f}  "
              f"forget p {p['forget_prob']:.3g}  FQ {fq}")
    print(f"wrote {out / 'ALIGNMENT.json'} and {out / 'ALIGNMENT.png'}")
    return 0


def _add_layers(asub) -> None:
    from .layers import layer_methods

    default = ",".join(layer_methods())
    y = asub.add_parser("layers", help="one unlearning run per method and layer (trained parameters l-2..l): forget "
                        "and retain metrics per layer, beside the target's mean activation norm there",
                        description="For every method with a layer setting and every layer: unlearn from the same "
                        "target with only the layer changed, score teacher-forced against the retain model; the "
                        "frozen target's mean token norm of h_l (HF hidden_states[l + 1]) on the forget QA beside it. "
                        "Writes LAYERS.json and LAYERS.png.")
    y.add_argument("--methods", type=_csv, default=_csv(default), metavar="M1,M2",
                   help=f"methods that take a layer setting (default: {default})")
    y.add_argument("--layers", required=True, metavar="A..B[:STEP],...",
                   help="decoder layers: 3..27 (inclusive), 3..27:4 (every 4th), 3,7,11 or a mix")
    y.add_argument("--steps", type=int, default=None, help="steps per run (default: each method's own budget)")
    y.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to every run (not layer or params: those follow --layers)")
    y.add_argument("--generate", action="store_true", help="also generate answers: ROUGE-L and model utility "
                   "(slower; off: teacher-forced numbers only)")
    y.add_argument("--max-new-tokens", type=int, default=200, help="with --generate (default %(default)s)")
    y.add_argument("--limit", type=int, default=None, help="score only the first N rows of each evaluation set "
                   "(quick looks; unlearning and the norms use the whole forget set)")
    _add_prepared_args(y, "LAYERS", batch_size=16)
    y.set_defaults(func=run_layers_cmd)


def run_layers_cmd(args) -> int:
    import copy

    from ..cli_common import check_model_args, prompt_format
    from ..data import tofu
    from ..eval.limits import at_least
    from ..eval.tofu import limit_task
    from ..methods.cli import parse_sets
    from ..models import load_model
    from ..train.loop import NonFiniteLoss
    from ..unlearning import resolve_config, unlearn
    from .layers import (check_layers, check_methods, check_sets, layers_figure, mean_token_norms, parse_layers,
                         reference_log, score_model, shape_model, summary_lines)

    at_least(args.steps, 1, "--steps", none_ok=True)
    at_least(args.batch_size, 1, "--batch-size")
    at_least(args.max_new_tokens, 1, "--max-new-tokens")
    at_least(args.limit, 1, "--limit", none_ok=True)
    check_model_args(args)
    methods = check_methods(args.methods)
    layers = parse_layers(args.layers)
    fixed = parse_sets(args.set)
    check_sets(fixed)
    if args.steps is not None:
        fixed["max_steps"] = args.steps
    runs = [(m, layer, {**fixed, "layer": layer}) for m in methods for layer in layers]
    check_layers(shape_model(args.model), [(m, layer, resolve_config(m, cfg)) for m, layer, cfg in runs], args.layers)
    out = check_out_dir(args.out, KIND["layers"], inputs=[args.model] if args.model and Path(args.model).exists()
                        else [])
    fmt = prompt_format(args)
    task = tofu.task(args.split)
    scored = limit_task(task, args.limit)
    score_kw = dict(fmt=fmt, batch_size=args.batch_size, max_length=args.max_length)
    paths, reference, _ = _prepared_with_retain(
        args, fmt, task, score=lambda model, tok: reference_log(model, tok, scored, **score_kw))
    say = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))

    def score(model) -> dict:
        return score_model(model, tokenizer, scored, reference=reference, generate=args.generate,
                           max_new_tokens=args.max_new_tokens, **score_kw)

    target, tokenizer = load_model(str(paths["target"]), dtype=args.dtype, device=args.device)
    norms = mean_token_norms(target, tokenizer, task.forget, layers, **score_kw)
    doc = {"split": args.split, "methods": methods, "layers": layers, "fixed": fixed, "generate": args.generate,
           "limit": args.limit,
           "norms": {"hidden_state": "h_l = output of decoder layer l = HF hidden_states[l + 1]; mean per-token L2 "
                     "norm over every real token (prompt and answer) of the forget QA, frozen target",
                     "tokens": norms["tokens"],
                     "per_layer": [{"layer": k, "mean_token_norm": v} for k, v in norms["norms"].items()]},
           "target": score(target), "runs": {m: [] for m in methods}}
    versions = None
    for i, (method, layer, overrides) in enumerate(runs, 1):
        say(f"[layers] {method} at layer {layer} ({i}/{len(runs)})")
        model = copy.deepcopy(target)  # every run starts from the same target
        try:
            info = unlearn(model, tokenizer, method, task.forget, task.retain_train_for_unlearning, overrides,
                           fmt=fmt, progress=not args.quiet)
        except NonFiniteLoss as e:  # one diverging run does not end the sweep: it is recorded as failed
            doc["runs"][method].append({"layer": layer, "error": str(e).split("; stopped")[0]})
            continue
        versions = versions or info["versions"]
        doc["runs"][method].append({"layer": layer, **score(info.pop("model")), "report": info["method_report"],
                                    "steps": len(info["steps"]), "train_seconds": info["train_seconds"],
                                    "trained_parameters": info["trained_parameters"], "config": info["config"]})
    doc.update(command=" ".join(sys.argv), options={k: v for k, v in vars(args).items() if k != "func"},
               versions=versions)

    def write(tmp: Path) -> None:
        write_json_atomic(tmp / "LAYERS.json", doc)
        layers_figure(doc, tmp / "LAYERS.png", title=f"{', '.join(methods)} across layers — {args.split}")

    write_folder(out, KIND["layers"], write)
    print("\n".join(summary_lines(doc)))
    print(f"wrote {out / 'LAYERS.json'} and {out / 'LAYERS.png'}")
    return 0
