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


@dataclass
class CorruptionConfig:
    """What to do to the selected embeddings. dims=None means the full embedding width."""
    method: str = "rand_noise_first_n"
    sigma: float = 1.0
    dims: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.method not in CORRUPTIONS:
            raise UserError(f"--corruption: unknown value {self.method!r}; choose one of {', '.join(CORRUPTIONS)}")
        if not (self.sigma >= 0):  # also rejects NaN
            raise UserError(f"--sigma: must be >= 0, got {self.sigma!r}")
        if self.dims is not None and self.dims < 1:
            raise UserError(f"--dims: must be >= 1, got {self.dims!r}")

    def apply(self, emb: torch.Tensor, mask: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        dims = min(self.dims or emb.shape[-1], emb.shape[-1])
        generator = torch.Generator().manual_seed(self.seed if seed is None else seed)
        return CORRUPTIONS[self.method](emb, mask.to(emb.device), dims, self.sigma, generator)

    def to_dict(self) -> dict:
        return asdict(self)
