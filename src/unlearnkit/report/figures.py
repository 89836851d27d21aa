"""The report's own figures (plots.py style: Okabe–Ito palette, labelled axes, the retain model and the target drawn
as reference points or lines). Figures that a command already draws (relearning curves, jailbreak bars, frontiers,
analyses) are drawn by that command's own function (see kinds.py), not here."""
from __future__ import annotations

import math

import numpy as np
from matplotlib.ticker import MaxNLocator

from ..plots import PALETTE, REFERENCE_STYLE, bar_style, line_style, pyplot, save

SET_PREFIXES = (("forget", "forget"), ("retain", "retain"), ("ra", "real\nauthors"), ("wf", "world\nfacts"))
SET_PANELS = (("prob", "probability p(a|q)"), ("rougeL_recall", "ROUGE-L recall"),
              ("truth_ratio", "truth ratio score"))
MIA_ATTACKS = (("loss", "loss"), ("zlib", "zlib"), ("mink", "Min-K% Prob"), ("minkpp", "Min-K%++"))
EVAL_LABELS = {"forget_prob": ("forget p(a|q)", "linear"), "forget_truth_ratio": ("forget truth ratio score", "linear"),
               "forget_quality": ("forget quality (KS p-value, log)", "log"),
               "retain_prob": ("retain p(a|q)", "linear"), "retain_truth_ratio": ("retain truth ratio score", "linear")}
MARKERS = ("o", "s", "^", "D", "v", "P", "<", ">")
LOSS_SKIP = {"step", "loss", "lr", "tokens", "seconds", "grad_norm", "eval"}


def finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def colour(m) -> str:
    return REFERENCE_STYLE[m.role]["color"] if m.role in REFERENCE_STYLE else PALETTE[m.colour % len(PALETTE)]


def _legend_outside(ax, **kw) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, **kw)


def fq_mu(m):
    """(forget quality, model utility) of a model; the retain model's forget quality is 1 by definition (the KS
    test of its truth ratios against themselves)."""
    fq, mu = m.summary.get("forget_quality"), m.summary.get("model_utility")
    if m.role == "retain" and fq is None:
        fq = 1.0
    return fq, mu


def fq_mu_figure(models, sweeps, path, title: str = ""):
    """Forget quality (log) against model utility: one point per model, each sweep's points and Pareto frontier,
    the retain model and the target as reference points (or lines when only one coordinate is known)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.4, 4.6))
    for m in models:
        fq, mu = fq_mu(m)
        fq = fq if finite(fq) and fq > 0 else None
        mu = mu if finite(mu) else None
        if m.role in REFERENCE_STYLE:
            style = REFERENCE_STYLE[m.role]
            what = f"{m.name} ({m.role} model)" if m.name != m.role else f"{m.role} model"
            if fq is not None and mu is not None:
                ax.scatter(mu, fq, marker="*" if m.role == "retain" else "X", s=140, color=style["color"], zorder=3,
                           alpha=0.8, label=what)
            elif fq is not None:
                ax.axhline(fq, **style, label=f"{what}: forget quality (utility not evaluated)")
            elif mu is not None:
                ax.axvline(mu, **style, label=f"{what}: model utility (no forget quality)")
        elif fq is not None and mu is not None:
            ax.scatter(mu, fq, marker=MARKERS[m.colour % len(MARKERS)], s=46, color=colour(m), zorder=5,
                       edgecolor="white", linewidth=0.5, label=m.name)
    for i, (label, rows, front) in enumerate(sweeps):
        c = PALETTE[(len(PALETTE) - 1 - i) % len(PALETTE)]  # from the palette's end: apart from the models' colours
        pts = [(r["summary"].get("model_utility"), r["summary"].get("forget_quality"), r["name"] in front)
               for r in rows]
        pts = [(x, y, on) for x, y, on in pts if finite(x) and finite(y) and y > 0]
        if not pts:
            continue
        ax.scatter([x for x, _, on in pts if not on], [y for _, y, on in pts if not on], s=16, color=c, alpha=0.45,
                   zorder=3)
        line = sorted((x, y) for x, y, on in pts if on)
        ax.plot(*zip(*line), color=c, marker="o", markersize=4, linewidth=1.4, zorder=3,
                label=f"sweep {label}: Pareto frontier")
    ax.set_yscale("log")
    ax.set_xlabel("model utility (higher is better)")
    ax.set_ylabel("forget quality (KS p-value, log; higher is better)")
    low, high = ax.get_ylim()
    ax.set_ylim(min(low, 0.5), max(high, 1.6))
    _legend_outside(ax)
    if title:
        ax.set_title(title)
    return save(fig, path)


def truth_ratios(cols: dict, variant: str = "tofu") -> np.ndarray:
    from ..eval.metrics import truth_ratio

    return truth_ratio(cols["avg_paraphrased_loss"], cols["average_perturb_loss"], variant)


def truth_ratio_figure(pairs, path, variant: str = "tofu"):
    """One panel per model: the histogram of its forget-set truth ratios R against the retain model's (grey), on a
    log axis, with the two-sample KS statistic D and its p-value (= forget quality)."""
    from matplotlib.ticker import FuncFormatter
    from scipy.stats import ks_2samp

    plt = pyplot()
    n = len(pairs)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 2.9 * rows), squeeze=False)
    for ax, (m, r, ref) in zip(axes.flat, pairs):
        both = np.concatenate([r, ref])
        both = both[both > 0]
        lo, hi = np.log10(both.min()), np.log10(both.max())
        bins = np.logspace(lo - 0.05, hi + 0.05, 21) if hi > lo else np.logspace(lo - 0.5, hi + 0.5, 11)
        ax.hist(ref, bins=bins, color="#bbbbbb", alpha=0.8, label="retain model")
        ax.hist(r, bins=bins, histtype="step", linewidth=1.8, color=colour(m),
                linestyle="--" if m.role == "target" else "-", label="target" if m.role == "target" else "this model")
        ks = ks_2samp(r, ref)
        ax.set_xscale("log")
        if hi - lo < 1:  # less than a decade: label the minor ticks too, else the axis shows one number
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
            ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
            ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_title(f"{m.name}\nKS D = {ks.statistic:.2f}, p = forget quality = {ks.pvalue:.3g}", fontsize=8.5)
        ax.set_xlabel(f"truth ratio R on forget QA (log; {variant})")
        ax.set_ylabel("questions")
        ax.legend(loc="upper right", fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    return save(fig, path)


def set_bars_figure(models, path):
    """Grouped bars per evaluation set (x) and model; the retain model and the target hatched grey; a value the
    model lacks is marked n/a, never drawn as 0."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(SET_PANELS), figsize=(4.3 * len(SET_PANELS), 3.7))
    width = 0.8 / len(models)
    for ax, (key, label) in zip(axes, SET_PANELS):
        for j, m in enumerate(models):
            xs = [i + (j - (len(models) - 1) / 2) * width for i in range(len(SET_PREFIXES))]
            kw = dict(bar_style(m.role, m.colour), edgecolor="white") if m.role in REFERENCE_STYLE else dict(
                color=colour(m))
            values = [m.summary.get(f"{p}_{key}") for p, _ in SET_PREFIXES]
            ax.bar(xs, [v if finite(v) else 0.0 for v in values], width, label=m.name, **kw)
            for x, v in zip(xs, values):
                if not finite(v):
                    ax.text(x, 0.02, "n/a", rotation=90, ha="center", va="bottom", fontsize=6.5, color="#444444")
        ax.set_xticks(range(len(SET_PREFIXES)))
        ax.set_xticklabels([name for _, name in SET_PREFIXES])
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(label)
        ax.set_title(label, fontsize=9)
        ax.grid(axis="x", visible=False)
    _legend_outside(axes[-1])
    return save(fig, path)


def training_figure(steps: list[dict], path, title: str = ""):
    """Training loss (total and its terms) and gradient norm against the optimizer step."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 3.4))
    x = [s["step"] for s in steps]
    axes[0].plot(x, [s.get("loss") for s in steps], color="#000000", linewidth=1.6, label="loss (total)")
    terms = [k for k in steps[0] if k not in LOSS_SKIP and finite(steps[0][k])]
    for i, k in enumerate(terms):
        axes[0].plot(x, [s.get(k) for s in steps], color=PALETTE[i % len(PALETTE)], linewidth=1.0, label=k)
    values = [v for s in steps for k, v in s.items() if (k == "loss" or k in terms) and finite(v)]
    positive = [v for v in values if v > 0]
    log = bool(positive) and min(values) >= 0 and max(positive) / min(positive) > 100
    if log:  # e.g. RMU: forget MSE in the hundreds, retain MSE near 0 (and exactly 0 at the first step)
        axes[0].set_yscale("log")
    axes[0].set_ylabel("loss (per batch" + (", log; zeros not drawn)" if log and 0 in values else
                                            ", log)" if log else ")"))
    if any(finite(s.get("grad_norm")) for s in steps):
        axes[1].plot(x, [s.get("grad_norm") for s in steps], color=PALETTE[0], linewidth=1.2)
        axes[1].set_ylabel("gradient norm (before clipping)")
    else:
        axes[1].text(0.5, 0.5, "no gradient norm logged", ha="center", va="center", transform=axes[1].transAxes)
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(loc="best", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return save(fig, path)


def in_training_figure(points: list[tuple], keys: list[str], path, references=(), kept=None, title: str = ""):
    """Each in-training metric against the step (0 = before unlearning); the kept step and the reference models'
    values as lines."""
    plt = pyplot()
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        label, scale = EVAL_LABELS.get(key, (key, "linear"))
        pts = [(s, e.get(key)) for s, e in points if finite(e.get(key)) and (scale != "log" or e.get(key) > 0)]
        ax.plot(*zip(*pts), **line_style("unlearned", "model", 0))
        for m in references:
            v = fq_mu(m)[0] if key == "forget_quality" else m.summary.get(key)
            if finite(v) and (scale != "log" or v > 0):
                ax.axhline(v, **REFERENCE_STYLE[m.role], label=f"{m.role} model")
        if kept is not None:
            ax.axvline(kept, color="#000000", linestyle=":", linewidth=1.0, label=f"kept step {kept}")
        ax.set_yscale(scale)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("optimizer step (0 = before unlearning)")
        ax.set_ylabel(label)
        ax.legend(loc="best", fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    return save(fig, path)


def roc(forget_scores, holdout_scores):
    """(fpr, tpr, auc) of calling a sample a member (forget set) when its loss-like score is low; the AUC equals
    eval.metrics.auc, the number in SUMMARY.json."""
    from sklearn.metrics import auc, roc_curve

    f, h = np.asarray(forget_scores, float), np.asarray(holdout_scores, float)
    fpr, tpr, _ = roc_curve(np.r_[np.ones(len(f)), np.zeros(len(h))], -np.r_[f, h])
    return fpr, tpr, float(auc(fpr, tpr))


def mia_roc_figure(curves, path):
    """One panel per membership-inference score: the ROC of each model (forget = members, holdout = non-members),
    chance on the diagonal."""
    plt = pyplot()
    attacks = [(a, name) for a, name in MIA_ATTACKS if any(a in per for _, per in curves)]
    cols = min(2, len(attacks))
    rows = math.ceil(len(attacks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.9 * rows), squeeze=False)
    for ax, (a, name) in zip(axes.flat, attacks):
        ax.plot([0, 1], [0, 1], color="#cccccc", linewidth=0.8, label="chance (AUC 0.5)")
        for m, per in curves:
            if a in per:
                fpr, tpr, auc = per[a]
                style = line_style(m.name, m.role, m.colour)
                style.pop("marker", None)
                style.pop("markersize", None)
                if m.role not in REFERENCE_STYLE:
                    style["color"] = colour(m)
                ax.plot(fpr, tpr, drawstyle="steps-post", linewidth=1.5, **{**style, "label": f"{m.name} "
                                                                            f"(AUC {auc:.2f})"})
        ax.set_title(f"{name} score", fontsize=9)
        ax.set_xlabel("false positive rate (holdout called member)")
        ax.set_ylabel("true positive rate (forget called member)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_aspect("equal")
        ax.legend(loc="lower right", fontsize=6.5)
    for ax in list(axes.flat)[len(attacks):]:
        ax.set_visible(False)
    return save(fig, path)
