"""Weight-space unlearning methods: one module each, holding its loss and DEFAULTS. `unlearnkit.unlearn` runs them."""
from . import ga, graddiff, npo, rmu, simnpo

# name → (module, defaults). Adaptive RMU is RMU with adaptive=True.
METHODS = {
    "ga": (ga, ga.DEFAULTS),
    "graddiff": (graddiff, graddiff.DEFAULTS),
    "npo": (npo, npo.DEFAULTS),
    "simnpo": (simnpo, simnpo.DEFAULTS),
    "rmu": (rmu, rmu.DEFAULTS),
    "adaptive_rmu": (rmu, rmu.ADAPTIVE_DEFAULTS),
}
