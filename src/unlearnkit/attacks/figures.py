"""Figures of the attack commands (plots.py style): relearning curves with the controls as reference lines, and
forget p(a|q) per attack and subject."""
from __future__ import annotations

from ..plots import bar_style, line_style, pyplot, save

CURVE_PANELS = (("forget_prob", "held-out forget p(a|q)", "linear"),
                ("forget_truth_ratio", "held-out forget truth ratio", "linear"),
                ("forget_quality", "forget quality (KS p-value, log)", "log"))


def relearn_figure(results: dict, path, title: str = ""):
    """One panel per metric, one line per subject, against relearning steps."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(4.2 * len(CURVE_PANELS), 3.4))
    models = 0
    for name, res in results.items():
        role = res.get("role", "model")
        style = line_style(name, role, models)
        models += role not in ("retain", "target")
        steps = [p["step"] for p in res["curve"]]
        for ax, (key, label, scale) in zip(axes, CURVE_PANELS):
            values = [p.get(key) for p in res["curve"]]
            pts = [(s, v) for s, v in zip(steps, values) if v is not None and (scale != "log" or v > 0)]
            if pts:
                ax.plot(*zip(*pts), **style)
    for ax, (key, label, scale) in zip(axes, CURVE_PANELS):
        ax.set_xlabel("relearning step")
        ax.set_ylabel(label)
        ax.set_yscale(scale)
        if key == "forget_quality" and not ax.lines:
            ax.text(0.5, 0.5, "no retain log given:\nforget quality not computed", ha="center", va="center",
                    transform=ax.transAxes)
    axes[0].legend(loc="best")
    if title:
        fig.suptitle(title)
    return save(fig, path)


def jailbreak_figure(summary: dict, roles: dict, path, title: str = ""):
    """Grouped bars: forget p(a|q) per attack (x) and subject (bars); controls hatched grey."""
    plt = pyplot()
    attacks = [a for a in next(iter(summary.values())) if not a.startswith("clean@")]
    names = list(summary)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(attacks) * max(1, len(names)) / 3 + 3), 3.8))
    width = 0.8 / len(names)
    models = 0
    for j, name in enumerate(names):
        role = roles.get(name, "model")
        kw = bar_style(role, models)
        models += role not in ("retain", "target")
        values = [summary[name].get(a, {}).get("forget_prob") or 0.0 for a in attacks]
        ax.bar([i + (j - (len(names) - 1) / 2) * width for i in range(len(attacks))], values, width, label=name,
               **kw)
    ax.set_xticks(range(len(attacks)))
    ax.set_xticklabels(attacks, rotation=30, ha="right")
    ax.set_ylabel("forget p(a|q) under attack")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", ncol=2)
    if title:
        ax.set_title(title)
    return save(fig, path)
