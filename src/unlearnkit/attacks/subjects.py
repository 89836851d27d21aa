"""What an attack runs against: model folders (weight-space unlearning), a model behind an ECO artifact, and the
two controls of the TOFU protocol — the retain model (never saw the forget authors) and the target (never
unlearned). Every attack runs the same way on each, so the controls say how much of an effect the attack alone
produces."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ECO_NOTE = ("ECO leaves the weights unchanged: a weight-space attack (relearning, GCG on the unguarded model) "
            "attacks the base weights behind the guard. ECO's threat model is black-box API access, where the guard "
            "sees every prompt; results are reported guard on, for completeness.")


@dataclass(frozen=True)
class Subject:
    name: str
    model: str | None          # model folder (None: the offline default model)
    eco: str | None = None     # ECO artifact folder guarding `model`
    role: str = "model"        # model | retain | target (controls)

    def describe(self) -> dict:
        return {"model": self.model, "eco": self.eco, "role": self.role}


def named(value: str, default_name: str | None = None) -> tuple[str, str]:
    """`NAME=PATH` or `PATH` (name: the folder's name)."""
    name, sep, path = value.partition("=")
    if sep and name and "/" not in name:
        return name, path
    return default_name or Path(value.rstrip("/")).name or value, value


def load(subject: Subject, *, dtype=None, device=None, trust_remote_code: bool = False):
    """(model, tokenizer, guard or None), freshly loaded: attacks that train change the weights in place."""
    from ..models import load_model

    model, tokenizer = load_model(subject.model, dtype=dtype or "fp32", device=device,
                                  trust_remote_code=trust_remote_code)
    guard = None
    if subject.eco:
        from ..eco import EcoGuard

        guard = EcoGuard.load(subject.eco, model, tokenizer, device=str(next(model.parameters()).device))
    return model, tokenizer, guard


def unique_names(subjects: list[Subject]) -> list[Subject]:
    """Distinct names (a second `mini-npo` becomes `mini-npo-2`): they key the results."""
    seen: dict[str, int] = {}
    out = []
    for s in subjects:
        n = seen.get(s.name, 0) + 1
        seen[s.name] = n
        out.append(s if n == 1 else Subject(f"{s.name}-{n}", s.model, s.eco, s.role))
    return out
