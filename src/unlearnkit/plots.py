"""One figure style for every plot unlearnkit writes: labelled axes, a colour-blind-safe palette (Okabe–Ito), the
retain model and the target drawn the same way everywhere (reference lines/points)."""
from __future__ import annotations

from pathlib import Path

PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
REFERENCE_STYLE = {"retain": dict(color="#555555", linestyle="--"), "target": dict(color="#999999", linestyle=":")}


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
                         "axes.spines.right": False, "font.size": 9, "legend.fontsize": 8})
    return plt


def line_style(name: str, role: str, i: int) -> dict:
    """Colour and line style of a series: controls get their reference style, others the palette in order."""
    if role in REFERENCE_STYLE:
        return dict(REFERENCE_STYLE[role], label=name)
    return dict(color=PALETTE[i % len(PALETTE)], linestyle="-", marker="o", markersize=3, label=name)


def bar_style(role: str, i: int) -> dict:
    """Colour (and hatch) of a bar: the retain model light grey hatched //, the target dark grey dotted, others the
    palette in order."""
    if role == "retain":
        return dict(color="#bbbbbb", hatch="//")
    if role == "target":
        return dict(color="#777777", hatch="..")
    return dict(color=PALETTE[i % len(PALETTE)])


def save(fig, path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, format=path.suffix.lstrip(".") or "png")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
