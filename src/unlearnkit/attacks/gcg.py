"""GCG, greedy coordinate gradient (Zou et al. 2023, "Universal and Transferable Adversarial Attacks on Aligned
Language Models"): search for a suffix of token ids that, placed right after the question, makes the model assign
high probability to the gold answer. Used to test whether an "unlearned" model still holds a fact.

Layout of one attacked prompt (token ids, joined as ids and never re-tokenised together):

    before = [BOS] + template prefix + question + " "    (GCGTarget.before)
    suffix = the suffix_len optimised tokens
    after  = end of user turn + assistant header (chat), "\\nAnswer:" (plain)    (GCGTarget.after)
    target = the answer ids as data.format.encode_qa labels them, optionally only the first N    (GCGTarget.target)

With an empty suffix, before + after is exactly encode_prompt(question + " ") (tests check it).
Loss = mean NLL of the target tokens, teacher-forced; with several targets (a universal suffix), the mean over targets.

One step: gradient of the loss w.r.t. a one-hot encoding of the suffix → per position, the top_k tokens with the most
negative gradient (allowed tokens only, the current token excluded) → `candidates` random single-token substitutions
(seeded torch.Generator) → exact loss of every candidate → move to the best candidate even if it is worse than the
current suffix (as GCG does); the best suffix seen is what run_gcg returns.

Fast path: `before` is the same for every candidate, so its KV cache is computed once per target (PreparedTarget);
candidates run in batches as [suffix + after + target] against a copy of that cache expanded to the batch, and the
LM head is applied only at the rows that predict target tokens. fast=False is the plain reference: one full forward
without cache per candidate. The two agree to ~1e-5 in fp32.

Allowed tokens: not special, and decoding to non-empty printable ASCII (the usual GCG filter). Suffixes are scored as
token ids, so by default there is no re-tokenisation check: suffix_text is for reading, and may not re-encode to the
same ids (use GCGResult.prompt_ids / example for the exact attacked prompt). With retokenize=True, candidates whose
decoded text does not re-encode (on its own) to the same ids are dropped, as in common GCG implementations.
"""
from __future__ import annotations

import contextlib
import copy
import time
import weakref
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ..data.format import IGNORE, PromptFormat, encode_qa, prompt_text
from ..errors import UserError
from ..train.nll import backbone_and_head

_MARK = "\x00gcg suffix\x00"  # stands for the suffix while the prompt text is split into before / after


# --- configuration and inputs ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GCGConfig:
    suffix_len: int = 20
    top_k: int = 256                  # tokens kept per suffix position from the gradient
    candidates: int = 128             # single-token substitutions evaluated per step
    steps: int = 50                   # 0: only evaluate the initial suffix
    batch_size: int = 32              # candidates per forward on the fast path
    seed: int = 0
    target_tokens: int | None = None  # score only the first N target tokens (None: all)
    init: str = "!"                   # a single-token string repeated suffix_len times, or "random" (seeded)
    retokenize: bool = False          # drop candidates whose decoded text re-encodes to other ids

    def __post_init__(self):
        for name, low in (("suffix_len", 1), ("top_k", 1), ("candidates", 1), ("steps", 0), ("batch_size", 1)):
            _check_int(name, getattr(self, name), low)
        _check_int("seed", self.seed, None)
        if self.target_tokens is not None:
            _check_int("target_tokens", self.target_tokens, 1)
        if not isinstance(self.init, str) or not self.init:
            raise UserError(f"GCGConfig.init: expected a non-empty string (a token, or 'random'), got {self.init!r}")
        if not isinstance(self.retokenize, bool):
            raise UserError(f"GCGConfig.retokenize: expected true or false, got {self.retokenize!r}")


def _check_int(name: str, value, low: int | None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low):
        need = "an integer" if low is None else f"an integer >= {low}"
        raise UserError(f"GCGConfig.{name}: expected {need}, got {value!r}")


@dataclass
class GCGTarget:
    before: list[int]  # prompt ids before the suffix (BOS, template prefix, question, separating space)
    after: list[int]   # prompt ids after the suffix (end of user turn, assistant header)
    target: list[int]  # answer ids whose likelihood the suffix maximises

    def prompt_ids(self, suffix: list[int]) -> list[int]:
        """The attacked prompt: what a model generates from."""
        return [*self.before, *suffix, *self.after]

    def example(self, suffix: list[int]) -> dict:
        """{"input_ids", "labels"} like data.format.encode_qa (labels -100 on the prompt), with the suffix inserted."""
        prompt = self.prompt_ids(suffix)
        return {"input_ids": prompt + self.target, "labels": [IGNORE] * len(prompt) + self.target}


def gcg_targets(tokenizer, pairs, fmt: PromptFormat = PromptFormat(),
                target_tokens: int | None = None) -> list[GCGTarget]:
    """One GCGTarget per (question, answer): the prompt split around the suffix slot, and the labelled answer ids."""
    targets = []
    for question, answer in pairs:
        # The prompt text of "question <suffix>", split where the suffix goes: each format keeps its own layout.
        before_text, after_text = prompt_text(tokenizer, question + " " + _MARK, fmt).split(_MARK)
        labels = encode_qa(tokenizer, question, answer, fmt)["labels"]
        target = [t for t in labels if t != IGNORE][:target_tokens]
        if not target:
            raise UserError(f"GCG target for question {question[:40]!r}: the answer has no tokens")
        targets.append(GCGTarget(tokenizer(before_text, add_special_tokens=True)["input_ids"],
                                 tokenizer(after_text, add_special_tokens=False)["input_ids"], target))
    return targets


class PreparedTarget:
    """A target on one model (use it with that model only): ids as tensors, and the KV cache of `before`, computed on
    first use by the fast path and never passed to a forward itself (each batch gets its own expanded copy), so it
    stays valid for the whole run."""

    def __init__(self, model, target: GCGTarget):
        device = model.get_input_embeddings().weight.device
        self.spec = target
        self.before = torch.tensor(target.before, dtype=torch.long, device=device)
        self.rest = torch.tensor(target.after + target.target, dtype=torch.long, device=device)  # after the suffix
        self.target = torch.tensor(target.target, dtype=torch.long, device=device)
        self._cache = None

    def prefix_cache(self, model):
        if self._cache is None and len(self.before):
            backbone, _ = backbone_and_head(model)
            with torch.no_grad(), _eval_mode(model):
                self._cache = (backbone or model)(input_ids=self.before[None], use_cache=True).past_key_values
        return self._cache


def _prepared(model, targets) -> list[PreparedTarget]:
    targets = [targets] if isinstance(targets, (GCGTarget, PreparedTarget)) else list(targets)
    if not targets:
        raise UserError("GCG: no targets")
    return [t if isinstance(t, PreparedTarget) else PreparedTarget(model, t) for t in targets]


# --- allowed tokens and the initial suffix --------------------------------------------------------------------------

_ALLOWED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer → ids (decoding the vocab takes ~1 s)


def allowed_token_ids(tokenizer) -> list[int]:
    """Token ids a suffix may use: not special, and decoding to non-empty printable ASCII."""
    if tokenizer not in _ALLOWED:
        special = set(tokenizer.all_special_ids)
        special |= {i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special}
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        _ALLOWED[tokenizer] = [i for i, s in enumerate(texts)
                               if i not in special and s and s.isascii() and s.isprintable()]
    return _ALLOWED[tokenizer]


def allowed_mask(model, tokenizer, allowed_ids: list[int] | None = None) -> torch.Tensor:
    """Bool [embedding rows]: the allowed tokens (rows past the tokenizer's vocabulary are padding: never)."""
    weight = model.get_input_embeddings().weight
    ids = allowed_token_ids(tokenizer) if allowed_ids is None else allowed_ids
    mask = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
    mask[torch.tensor([i for i in ids if 0 <= i < weight.shape[0]], dtype=torch.long, device=weight.device)] = True
    if mask.sum() < 2:
        raise UserError("GCG: fewer than 2 allowed tokens; nothing to search")
    return mask


def initial_suffix(tokenizer, config: GCGConfig, allowed: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    if config.init == "random":
        pool = allowed.nonzero().squeeze(1).cpu()
        return pool[torch.randint(len(pool), (config.suffix_len,), generator=generator)].to(allowed.device)
    ids = tokenizer(config.init, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or not allowed[ids[0]]:
        raise UserError(f"GCGConfig.init: {config.init!r} is not one allowed token; use e.g. '!' or 'random'")
    return torch.full((config.suffix_len,), ids[0], dtype=torch.long, device=allowed.device)


# --- losses: fast (prefix cache, batched, head at target rows) and naive (full forward per candidate) ---------------

def _batch_cache(cache, n: int):
    """A copy of the prefix cache expanded to n rows; the forward appends to the copy, never to the original."""
    if cache is None:
        return None
    batch = copy.deepcopy(cache)
    batch.batch_repeat_interleave(n)
    return batch


def _fast_target_logits(model, t: PreparedTarget, n: int, **inputs) -> torch.Tensor:
    """Logits [n, T, V] at the rows predicting the target, for n sequences [suffix + after + target] after `before`
    (input_ids or inputs_embeds)."""
    x = inputs.get("input_ids", inputs.get("inputs_embeds"))
    rows = slice(x.shape[1] - len(t.target) - 1, x.shape[1] - 1)  # row j predicts token j + 1
    backbone, head = backbone_and_head(model)
    cache = _batch_cache(t.prefix_cache(model), n)
    if backbone is None:
        return model(**inputs, past_key_values=cache, use_cache=True).logits[:, rows].float()
    hidden = backbone(**inputs, past_key_values=cache, use_cache=True).last_hidden_state
    return head(hidden[:, rows]).float()


def _naive_target_logits(model, t: PreparedTarget, **inputs) -> torch.Tensor:
    """Logits [B, T, V] predicting the target, from a full forward over the whole sequence (no cache)."""
    T = len(t.target)
    return model(**inputs, use_cache=False).logits[:, -T - 1:-1].float()


def _nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean token NLL per row: logits [B, T, V], target [T] → [B]."""
    return F.cross_entropy(logits.transpose(1, 2), target.expand(logits.shape[0], -1), reduction="none").mean(1)


def _losses_one(model, t: PreparedTarget, cands: torch.Tensor, fast: bool, batch_size: int) -> torch.Tensor:
    out = []
    if fast:
        for s in range(0, len(cands), batch_size):
            chunk = cands[s:s + batch_size]
            ids = torch.cat([chunk, t.rest.expand(len(chunk), -1)], dim=1)
            out.append(_nll(_fast_target_logits(model, t, len(chunk), input_ids=ids), t.target))
    else:
        for c in cands:
            ids = torch.cat([t.before, c, t.rest])[None]
            out.append(_nll(_naive_target_logits(model, t, input_ids=ids), t.target))
    return torch.cat(out)


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()  # no dropout while scoring; the caller's mode comes back afterwards
    try:
        yield
    finally:
        model.train(was_training)


def candidate_losses(model, targets, candidates: torch.Tensor, *, fast: bool = True,
                     batch_size: int = 32) -> torch.Tensor:
    """Loss of each candidate suffix (ids [C, L]): mean target NLL, averaged over targets (a GCGTarget, a
    PreparedTarget or a list of them). Returns float32 [C]."""
    prepared = _prepared(model, targets)
    device = prepared[0].before.device
    candidates = torch.as_tensor(candidates, dtype=torch.long, device=device)
    if candidates.ndim != 2 or candidates.shape[1] < 1:
        raise UserError(f"GCG candidates: expected ids of shape [C, L] with L >= 1, got {tuple(candidates.shape)}")
    with _eval_mode(model), torch.no_grad():
        return sum(_losses_one(model, t, candidates, fast, batch_size) for t in prepared) / len(prepared)


def token_gradients(model, targets, suffix: torch.Tensor, *, fast: bool = True) -> torch.Tensor:
    """Gradient of the loss w.r.t. the one-hot suffix [L, V]. Only the one-hot requires grad (torch.autograd.grad):
    no .grad is left on the model's parameters."""
    prepared = _prepared(model, targets)
    embed = model.get_input_embeddings()
    weight = embed.weight.detach()
    one_hot = torch.zeros(len(suffix), weight.shape[0], dtype=weight.dtype, device=weight.device)
    one_hot[torch.arange(len(suffix)), suffix] = 1
    one_hot.requires_grad_(True)
    grad = torch.zeros_like(one_hot)
    with _eval_mode(model):
        for t in prepared:
            with torch.no_grad():
                rest = embed(t.rest)[None]
            suffix_embeds = (one_hot @ weight)[None]
            if fast:
                logits = _fast_target_logits(model, t, 1, inputs_embeds=torch.cat([suffix_embeds, rest], dim=1))
            else:
                with torch.no_grad():
                    before = embed(t.before)[None]
                embeds = torch.cat([before, suffix_embeds, rest], dim=1)
                logits = _naive_target_logits(model, t, inputs_embeds=embeds)
            loss = _nll(logits, t.target)[0] / len(prepared)
            grad += torch.autograd.grad(loss, one_hot)[0]
    return grad


# --- one step and the search ----------------------------------------------------------------------------------------

def sample_candidates(grad: torch.Tensor, suffix: torch.Tensor, allowed: torch.Tensor, top_k: int, n: int,
                      generator: torch.Generator) -> torch.Tensor:
    """n suffixes [n, L], each the current one with one position replaced by one of that position's top_k tokens
    (most negative gradient, allowed only, never the current token). Draws come from `generator` (CPU)."""
    score = grad.detach().float().clone()
    score[:, ~allowed] = float("inf")
    score[torch.arange(len(suffix)), suffix] = float("inf")  # a candidate must change the suffix
    k = min(top_k, int(allowed.sum()) - 1)
    top = (-score).topk(k, dim=1).indices.cpu()  # [L, k]
    positions = torch.randint(len(suffix), (n,), generator=generator)
    picks = torch.randint(k, (n,), generator=generator)
    cands = suffix.cpu().repeat(n, 1)
    cands[torch.arange(n), positions] = top[positions, picks]
    return cands.to(suffix.device)


def _retokenizable(tokenizer, cands: torch.Tensor) -> torch.Tensor:
    rows = cands.tolist()
    again = tokenizer(tokenizer.batch_decode(rows), add_special_tokens=False)["input_ids"]
    keep = [a == ids for a, ids in zip(again, rows)]
    return cands[torch.tensor(keep, device=cands.device)] if any(keep) else cands  # none pass: keep all, GCG goes on


def gcg_step(model, targets, suffix: torch.Tensor, allowed: torch.Tensor, config: GCGConfig,
             generator: torch.Generator, *, fast: bool = True, tokenizer=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One GCG step: (candidate suffixes [C, L], their losses [C]). fast=False computes the same quantities with full
    forwards and no cache (the reference the bench times)."""
    prepared = _prepared(model, targets)
    grad = token_gradients(model, prepared, suffix, fast=fast)
    cands = sample_candidates(grad, suffix, allowed, config.top_k, config.candidates, generator)
    if config.retokenize:
        if tokenizer is None:
            raise UserError("GCGConfig.retokenize: True needs the tokenizer (gcg_step(..., tokenizer=...))")
        cands = _retokenizable(tokenizer, cands)
    return cands, candidate_losses(model, prepared, cands, fast=fast, batch_size=config.batch_size)


@dataclass
class GCGResult:
    suffix_ids: list[int]     # the best suffix found
    suffix_text: str          # its decoding (for reading; the ids are what was scored)
    loss: float               # its loss: mean target NLL (averaged over targets)
    initial_loss: float       # loss of the initial suffix
    history: list[float]      # best loss so far after each step (non-increasing)
    step_losses: list[float]  # loss of the suffix GCG moved to at each step (may rise)
    seconds: float
    config: dict
    targets: list[GCGTarget] = field(repr=False)

    def prompt_ids(self, i: int = 0) -> list[int]:
        """Attacked prompt ids for target i (before + suffix + after), to generate from."""
        return self.targets[i].prompt_ids(self.suffix_ids)

    def example(self, i: int = 0) -> dict:
        """{"input_ids", "labels"} of target i with the suffix inserted, like data.format.encode_qa."""
        return self.targets[i].example(self.suffix_ids)


def run_gcg(model, targets, config: GCGConfig | None = None, *, tokenizer, allowed_ids: list[int] | None = None,
            progress: bool = False) -> GCGResult:
    """Search a suffix for one target (per-question suffix) or several (universal suffix, mean loss).

    Deterministic for a given config and seed (on a deterministic device). The model's weights, requires_grad flags
    and train/eval mode are left as they were; no .grad is left on its parameters."""
    from tqdm.auto import tqdm

    config = config or GCGConfig()
    specs = [targets] if isinstance(targets, GCGTarget) else list(targets)
    specs = [GCGTarget(t.before, t.after, t.target[:config.target_tokens]) for t in specs]
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    allowed = allowed_mask(model, tokenizer, allowed_ids)
    suffix = initial_suffix(tokenizer, config, allowed, generator)
    prepared = _prepared(model, specs)  # holds the prefix caches for the whole search
    loss = float(candidate_losses(model, prepared, suffix[None], batch_size=config.batch_size)[0])
    best, best_loss, initial_loss = suffix, loss, loss
    history, step_losses = [], []
    bar = tqdm(range(config.steps), desc="GCG", disable=not progress)
    for _ in bar:
        cands, losses = gcg_step(model, prepared, suffix, allowed, config, generator, tokenizer=tokenizer)
        i = int(losses.argmin())
        suffix, loss = cands[i], float(losses[i])  # GCG moves to the best candidate even when it is worse
        if loss < best_loss:
            best, best_loss = suffix, loss
        history.append(best_loss)
        step_losses.append(loss)
        bar.set_postfix(loss=f"{loss:.3f}", best=f"{best_loss:.3f}")
    ids = best.tolist()
    return GCGResult(suffix_ids=ids, suffix_text=tokenizer.decode(ids), loss=best_loss, initial_loss=initial_loss,
                     history=history, step_losses=step_losses, seconds=time.perf_counter() - start,
                     config=asdict(config), targets=specs)
