"""Corruption functions for input embeddings (ECO; Liu et al., 2024).

Each function takes embeddings `emb` [B, T, H] and a bool mask [B, T] of the token positions to corrupt, and
returns a new tensor (the input is never modified in place). Only masked positions change.

- rand_noise_first_n: add N(0, sigma^2) to the first `dims` dimensions (the paper's main corruption),
- rand_noise_rand_n:  add N(0, sigma^2) to `dims` dimensions drawn at random for each token,
- zero_out_top_k:     set the `dims` largest-magnitude dimensions of each token to 0,
- flip_sign_top_k:    negate the `dims` largest-magnitude dimensions of each token.

Noise comes from a CPU generator seeded by the caller, so a seed gives the same noise on any device.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..errors import UserError


def _noise(shape, sigma: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float32) * sigma


def rand_noise_first_n(emb, mask, dims: int, sigma: float, generator=None):
    out = emb.clone()
    n = int(mask.sum())
    if n == 0:
        return out
    noise = _noise((n, dims), sigma, generator).to(emb.device)
    picked = out[mask]  # [n, H]
    picked[:, :dims] = (picked[:, :dims].float() + noise).to(emb.dtype)
    out[mask] = picked
    return out


def rand_noise_rand_n(emb, mask, dims: int, sigma: float, generator=None):
    out = emb.clone()
    n = int(mask.sum())
    if n == 0:
        return out
    hidden = emb.shape[-1]
    # `dims` distinct random dimensions per token: the first `dims` of a random permutation of each row.
    cols = torch.rand((n, hidden), generator=generator).argsort(dim=1)[:, :dims].to(emb.device)
    noise = _noise((n, dims), sigma, generator).to(emb.device)
    picked = out[mask].float()
    picked.scatter_add_(1, cols, noise)
    out[mask] = picked.to(emb.dtype)
    return out


def _top_k_cols(values: torch.Tensor, dims: int) -> torch.Tensor:
    return values.abs().topk(dims, dim=1).indices


def zero_out_top_k(emb, mask, dims: int, sigma: float = 0.0, generator=None):
    out = emb.clone()
    if not mask.any():
        return out
    picked = out[mask]
    picked.scatter_(1, _top_k_cols(picked, dims), 0.0)
    out[mask] = picked
    return out


def flip_sign_top_k(emb, mask, dims: int, sigma: float = 0.0, generator=None):
    out = emb.clone()
    if not mask.any():
        return out
    picked = out[mask]
    cols = _top_k_cols(picked, dims)
    picked.scatter_(1, cols, -picked.gather(1, cols))
    out[mask] = picked
    return out


CORRUPTIONS = {f.__name__: f for f in (rand_noise_first_n, rand_noise_rand_n, zero_out_top_k, flip_sign_top_k)}
NOISE_METHODS = ("rand_noise_first_n", "rand_noise_rand_n")  # the ones whose strength sigma is searched


SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed accepts


def corruption_problem(method, sigma, dims, seed) -> tuple[str, str] | None:
    """(field, what is wrong) for a bad corruption setting, else None. Shared by the CLI and the artifact reader,
    which name the field differently."""
    if not isinstance(method, str) or method not in CORRUPTIONS:
        return "corruption", f"unknown value {method!r}; choose one of {', '.join(CORRUPTIONS)}"
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
        return "sigma", f"must be a finite number >= 0, got {sigma!r}"
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or dims < 1):
        return "dims", f"must be an integer >= 1, got {dims!r}"
    if isinstance(seed, bool) or not isinstance(seed, int) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        return "seed", f"must be an integer in [-2^63, 2^64 - 1], got {seed!r}"
    return None


@dataclass
class CorruptionConfig:
    """What to do to the selected embeddings. dims=None means the full embedding width."""
    method: str = "rand_noise_first_n"
    sigma: float = 1.0
    dims: int | None = None
    seed: int = 0

    def __post_init__(self):
        problem = corruption_problem(self.method, self.sigma, self.dims, self.seed)
        if problem:
            raise UserError(f"--{problem[0]}: {problem[1]}")

    @classmethod
    def from_dict(cls, d, source: str = "corruption") -> "CorruptionConfig":
        """From an artifact's `corruption` object; every field is checked, errors name `source` and the field."""
        if not isinstance(d, dict):
            raise UserError(f"{source}: field 'corruption' must be an object, got {d!r:.60}")
        unknown = sorted(set(d) - {"method", "sigma", "dims", "seed"})
        if unknown or "method" not in d or "sigma" not in d:
            raise UserError(f"{source}: field 'corruption' needs method, sigma, dims, seed"
                            + (f" (unknown field {unknown[0]!r})" if unknown else ""))
        values = (d["method"], d["sigma"], d.get("dims"), d.get("seed", 0))
        problem = corruption_problem(*values)
        if problem:
            name = "method" if problem[0] == "corruption" else problem[0]
            raise UserError(f"{source}: field 'corruption.{name}': {problem[1]}")
        return cls(*values)

    def check_width(self, hidden: int, option: str = "--dims") -> None:
        """dims cannot exceed the embedding width of the model it is applied to."""
        if self.dims is not None and self.dims > hidden:
            raise UserError(f"{option}: {self.dims} is larger than the model's embedding width {hidden}")

    def apply(self, emb: torch.Tensor, mask: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        dims = min(self.dims or emb.shape[-1], emb.shape[-1])
        generator = torch.Generator().manual_seed(self.seed if seed is None else seed)
        return CORRUPTIONS[self.method](emb, mask.to(emb.device), dims, self.sigma, generator)

    def to_dict(self) -> dict:
        return asdict(self)
