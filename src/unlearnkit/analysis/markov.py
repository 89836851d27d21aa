"""SimNPO's synthetic study: unlearning a mixture of Markov chains (Fan et al., 2024, "Simplicity Prevails", the
mixture-of-Markov-chains analysis; the authors' code is OPTML-Group/Unlearn-Simple, folder synthetic/).

Setting (defaults = the paper's, as run by the authors' scripts):
- 10 states; three disjoint 3-state subsets: retain {0,1,2}, forget1 {3,4,5}, forget2 {6,7,8} (state 9 belongs to
  none). Each chain's transition matrix moves from a state of its subset to each state of the subset with 0.8/3 and
  to each of the 7 other states with 0.2/7; a row of a state outside the subset is uniform (1/10). Its initial
  distribution is the row of a state inside the subset.
- 10,000 retain and 5,000 + 5,000 forget sequences of 20 states; each set split 80/20 into train and test.
  Variant A: forget2 sequences have 20 states too; variant B: 5 (short responses).
- A GPT-2 decoder (transformers' GPT2LMHeadModel: 4 layers, 4 heads, width 128, vocabulary = the 10 states, no
  special tokens) pretrained on retain + forget1 (forget2 is never seen: the weakly memorised part of the forget
  set), and a retain-only model (trained on retain alone, same recipe) as the reference: AdamW lr 5e-4, batch 128,
  5 epochs, token-mean cross-entropy on every state after the first.
- Unlearning the whole forget set (forget1 + forget2 training sequences, shuffled together) from the pretrained
  model with NPO or SimNPO: AdamW lr 5e-4, batch 4, at most 50 steps, β = 1, no retain term (as the authors' NPO and
  SimNPO runs), SimNPO with γ = 0. After every step: the per-token KL(retain-only model ‖ model) on the retain,
  forget1 and forget2 test sets — the mean over every scored position of every test sequence of
  Σ_s p_retain(s | prefix) · log(p_retain(s | prefix) / p_model(s | prefix)).

The pretraining data hold no forget2 sequence, so the pretrained and retain-only models do not depend on the
variant: they are trained once and shared by both variants (retain and forget1 data are drawn from their own seeded
streams, identical in A and B).

MARKOV.json: "settings"; "chains" (subsets, transition matrices); "models" (pretraining losses per epoch, seconds);
"variants": {variant: {method: [{"step": 0, "kl_retain", "kl_forget1", "kl_forget2"}, {"step": 1, ..., "loss"},
...]}} (step 0 = the pretrained model, before unlearning); "variant_info": {variant: forget2 length, set sizes,
"before_unlearning" KLs of the pretrained model, test NLL and KL to the true chains of both models, seconds};
"summary" (see `summarize`); "seconds" (wall time of the whole study).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..data.batching import collate
from ..data.format import IGNORE
from ..errors import UserError

N_STATES = 10
SUBSETS = {"retain": (0, 1, 2), "forget1": (3, 4, 5), "forget2": (6, 7, 8)}
WITHIN = 0.8  # mass a chain keeps inside its subset; the rest (0.2) is spread evenly over the other states
SETS = ("retain", "forget1", "forget2")
VARIANTS = ("A", "B")
METHODS = ("npo", "simnpo")
ADAM_EPS = 1e-6  # the authors' optimizer is transformers' AdamW: eps 1e-6, no weight decay, no clipping, no schedule


@dataclass
class MarkovSettings:
    variants: tuple = VARIANTS
    methods: tuple = METHODS
    steps: int = 50                  # unlearning steps (the authors' max_iterations)
    seed: int = 0
    n_retain: int = 10_000
    n_forget: int = 5_000            # each of forget1 and forget2
    length: int = 20                 # retain and forget1 length (and forget2 in variant A)
    short_length: int = 5            # forget2 length in variant B
    test_fraction: float = 0.2
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    pretrain_epochs: float = 5.0
    pretrain_batch_size: int = 128
    pretrain_lr: float = 5e-4
    lr: float = 5e-4                 # unlearning
    batch_size: int = 4              # unlearning
    beta: float = 1.0
    eval_batch_size: int = 1024
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        """Every value checked before any work: a bad one is a one-line error naming its option."""
        def integer(name, lo, hi=None):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v >= hi):
                bound = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi})"
                raise UserError(f"--{name.replace('_', '-')} {v!r}: must be {bound}")

        def number(name, ok, what):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise UserError(f"--{name.replace('_', '-')} {v!r}: must be {what}")

        self.variants, self.methods = tuple(self.variants), tuple(self.methods)
        for name, allowed in (("variants", VARIANTS), ("methods", METHODS)):
            values = getattr(self, name)
            bad = [v for v in values if v not in allowed]
            if not values or bad or len(set(values)) != len(values):
                what = f"unknown value {bad[0]!r}" if bad else "empty" if not values else "a value repeated"
                raise UserError(f"--{name} {','.join(values)}: {what}; give a comma-separated list of "
                                f"{', '.join(allowed)}")
        integer("steps", 1)
        integer("seed", 0, 2**32)
        for name in ("n_retain", "n_forget"):
            integer(name, 2)
        integer("length", 2)
        integer("short_length", 2)
        number("test_fraction", lambda v: 0 < v < 1, "in (0, 1)")
        for name in ("n_retain", "n_forget"):  # both halves of the split must hold a sequence
            n, n_test = getattr(self, name), _n_test(getattr(self, name), self.test_fraction)
            if not 1 <= n_test <= n - 1:
                raise UserError(f"--{name.replace('_', '-')} {n}: too few sequences for a train/test split with "
                                f"--test-fraction {self.test_fraction} (each part needs at least one)")
        integer("n_layer", 1)
        integer("n_head", 1)
        integer("n_embd", 1)
        if self.n_embd % self.n_head:
            raise UserError(f"--n-embd {self.n_embd}: must be a multiple of --n-head {self.n_head}")
        number("pretrain_epochs", lambda v: v > 0, "a number > 0")
        integer("pretrain_batch_size", 1)
        integer("batch_size", 1)
        integer("eval_batch_size", 1)
        for name in ("pretrain_lr", "lr", "beta"):
            number(name, lambda v: v > 0, "a number > 0")

    def forget2_length(self, variant: str) -> int:
        return self.length if variant == "A" else self.short_length


def _sub_seed(seed: int, k: int) -> int:
    """The seed of one stage (pretraining, retain-only training, unlearning), in the loop's range [0, 2^32)."""
    return (seed + k) % 2**32


def _n_test(n: int, fraction: float) -> int:
    return int(round(n * fraction))


# ---------------------------------------------------------------------------------------------------------- chains

def chain_row(subset, n_states: int = N_STATES, within: float = WITHIN) -> np.ndarray:
    """The next-state distribution from a state inside `subset` (also the chain's initial distribution)."""
    row = np.full(n_states, (1.0 - within) / (n_states - len(subset)))
    row[list(subset)] = within / len(subset)
    return row


def transition_matrix(subset, n_states: int = N_STATES, within: float = WITHIN) -> np.ndarray:
    """Rows of states in `subset`: `chain_row`; rows of the other states: uniform."""
    matrix = np.full((n_states, n_states), 1.0 / n_states)
    matrix[list(subset)] = chain_row(subset, n_states, within)
    return matrix


def sample_chain(matrix: np.ndarray, initial: np.ndarray, n: int, length: int, rng: np.random.Generator):
    """n sequences of `length` states ([n, length] int64), vectorised inverse-CDF sampling."""
    def draw(cdf):  # cdf: [n, S]; index j with cdf[j-1] <= u < cdf[j]
        u = rng.random(len(cdf))
        return np.minimum((u[:, None] >= cdf).sum(1), cdf.shape[1] - 1)

    seqs = np.empty((n, length), dtype=np.int64)
    seqs[:, 0] = draw(np.broadcast_to(np.cumsum(initial), (n, len(initial))))
    cdf = np.cumsum(matrix, axis=1)
    for t in range(1, length):
        seqs[:, t] = draw(cdf[seqs[:, t - 1]])
    return seqs


def make_data(settings: MarkovSettings, variant: str) -> dict[str, np.ndarray]:
    """{"retain_train", "retain_test", "forget1_train", ...}: arrays [n, length]. Each subset has its own seeded
    stream (sampling and split), so retain and forget1 are the same in every variant."""
    sizes = {"retain": settings.n_retain, "forget1": settings.n_forget, "forget2": settings.n_forget}
    lengths = {"retain": settings.length, "forget1": settings.length, "forget2": settings.forget2_length(variant)}
    data = {}
    for i, name in enumerate(SETS):
        subset = SUBSETS[name]
        rng = np.random.default_rng([settings.seed, i])
        seqs = sample_chain(transition_matrix(subset), chain_row(subset), sizes[name], lengths[name], rng)
        order = np.random.default_rng([settings.seed, 10 + i]).permutation(sizes[name])
        n_test = _n_test(sizes[name], settings.test_fraction)
        data[f"{name}_test"], data[f"{name}_train"] = seqs[order[:n_test]], seqs[order[n_test:]]
    return data


def batch_of(seqs) -> dict[str, torch.Tensor]:
    """State sequences (arrays or lists; lengths may differ) → a right-padded batch; every state after the first is
    scored (labels), as `data.format.encode_text` does for raw text and as the authors do (input = seq[:-1],
    target = seq[1:]). Padding: state 0 with attention 0 and label IGNORE."""
    return collate([{"input_ids": list(map(int, s)), "labels": [IGNORE] + list(map(int, s[1:]))} for s in seqs],
                   pad_id=0)


def _batches(seqs: list, batch_size: int, order) -> list[dict]:
    out = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = batch_of([seqs[i] for i in idx])
        batch["index"] = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        out.append(batch)
    return out


# ----------------------------------------------------------------------------------------------------------- model

def build_model(settings: MarkovSettings, max_length: int, seed: int):
    """A freshly initialised GPT-2 decoder over the 10 states (seeded)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=N_STATES, n_positions=max_length, n_embd=settings.n_embd,
                        n_layer=settings.n_layer, n_head=settings.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=None, eos_token_id=None, use_cache=False)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.eval()
    return model


def _train_config(settings: MarkovSettings, seed: int, **kw):
    from ..train.loop import TrainConfig

    return TrainConfig(warmup_ratio=0.0, schedule="constant", weight_decay=0.0, max_grad_norm=None,
                       adam_eps=ADAM_EPS, seed=seed, mixed_precision="no", **kw)


def pretrain(model, train_seqs, settings: MarkovSettings, seed: int, progress: bool = False, desc: str = "pretrain"):
    """Next-state cross-entropy (token mean) on `train_seqs`, through the project's training loop; returns its log."""
    from ..train.loop import train
    from ..train.nll import mean_token_nll

    seqs = list(train_seqs)
    cfg = _train_config(settings, seed, lr=settings.pretrain_lr, epochs=settings.pretrain_epochs,
                        batch_size=settings.pretrain_batch_size)

    def batches_for_epoch(epoch: int):
        order = np.random.default_rng([seed, 100, epoch]).permutation(len(seqs))
        return _batches(seqs, settings.pretrain_batch_size, order)

    def step_loss(m, batch):
        # full_logits: the head-at-labels shortcut of train.nll does not find GPT-2's backbone (get_decoder()
        # returns the whole model for GPT2LMHeadModel); the full path is equal and cheap at 10 states.
        return mean_token_nll(m, batch, full_logits=True), {}

    return train(model, step_loss, batches_for_epoch, cfg, progress=progress, desc=desc)


# ------------------------------------------------------------------------------------------------------ evaluation

@torch.no_grad()
def scored_log_probs(model, seqs, batch_size: int = 1024):
    """Log next-state distributions at every scored position (each state after the first), in order: sequence by
    sequence, position by position. Returns (log_probs [N, S] float64, targets [N])."""
    from ..train.nll import label_logits

    was_training = model.training
    model.eval()
    out, targets = [], []
    for start in range(0, len(seqs), batch_size):
        logits, target, _ = label_logits(model, batch_of(seqs[start:start + batch_size]), full_logits=True)
        out.append(F.log_softmax(logits.double(), dim=-1))
        targets.append(target)
    model.train(was_training)
    return torch.cat(out), torch.cat(targets)


def chain_log_probs(seqs, subset) -> torch.Tensor:
    """The true log next-state distributions of the chain that drew `seqs`, in `scored_log_probs` order."""
    log_matrix = torch.log(torch.as_tensor(transition_matrix(subset), dtype=torch.float64))
    return torch.cat([log_matrix[torch.as_tensor(np.asarray(s[:-1]), dtype=torch.long)] for s in seqs])


def mean_token_kl(ref_log_probs: torch.Tensor, log_probs: torch.Tensor) -> float:
    """Mean over scored positions of KL(ref ‖ model) = Σ_s p_ref(s)·(log p_ref(s) − log p_model(s))."""
    ref = ref_log_probs.double()
    return float((ref.exp() * (ref - log_probs.double())).sum(-1).mean())


def mean_nll(log_probs: torch.Tensor, targets: torch.Tensor) -> float:
    return float(-log_probs.gather(1, targets[:, None]).mean())


# ------------------------------------------------------------------------------------------------------ unlearning

@torch.no_grad()
def reference_nll(model, batches, n: int) -> torch.Tensor:
    """Summed NLL of every forget sequence under the model before unlearning ([n], by index): NPO's reference."""
    from ..train.nll import sequence_nll

    out = torch.full((n,), float("nan"))
    for batch in batches:
        out[batch["index"]] = sequence_nll(model, batch, full_logits=True)[0].float()
    return out


def unlearn(model, method: str, forget_seqs: list, settings: MarkovSettings, seed: int, evaluate,
            progress: bool = False, desc: str = "unlearn", start: dict | None = None) -> list[dict]:
    """NPO or SimNPO on `forget_seqs` for settings.steps steps; `evaluate(model)` → {"kl_retain", ...} is called
    after every step, and before the first unless `start` (the same evaluation of this model, done already) is
    given. Returns [{"step": 0, ...}, {"step": 1, ..., "loss"}, ...]."""
    from ..methods.npo import npo_forget_loss
    from ..methods.simnpo import simnpo_forget_loss
    from ..train.loop import train
    from ..train.nll import sequence_nll

    cfg = _train_config(settings, seed, lr=settings.lr, max_steps=settings.steps, batch_size=settings.batch_size)

    def batches_for_epoch(epoch: int):
        order = np.random.default_rng([seed, 200, epoch]).permutation(len(forget_seqs))
        return _batches(forget_seqs, settings.batch_size, order)

    if method == "npo":
        # The reference is the model before unlearning: every sequence's summed NLL, once, in large batches.
        order = np.arange(len(forget_seqs))
        ref = reference_nll(model, _batches(forget_seqs, settings.eval_batch_size, order), len(forget_seqs))

        def step_loss(m, batch):
            nll, _ = sequence_nll(m, batch, full_logits=True)
            return npo_forget_loss(nll, ref[batch["index"]], settings.beta), {"forget_nll": nll.mean().item()}
    elif method == "simnpo":
        def step_loss(m, batch):
            nll, n_tokens = sequence_nll(m, batch, full_logits=True)
            loss = simnpo_forget_loss(nll, n_tokens, settings.beta, 0.0, "paper")
            return loss, {"forget_nll_per_token": (nll / n_tokens).mean().item()}
    else:
        raise UserError(f"--methods: unknown method {method!r}; choose {', '.join(METHODS)}")

    path = [{"step": 0, **(start if start is not None else evaluate(model))}]

    def on_step(step, entry):
        path.append({"step": step, **evaluate(model), "loss": entry["loss"]})

    train(model, step_loss, batches_for_epoch, cfg, progress=progress, desc=desc, on_step=on_step)
    return path


# ------------------------------------------------------------------------------------------------------- the study

def run_markov(settings: MarkovSettings, progress: bool = False, log=None) -> dict:
    """The whole study; returns the MARKOV.json object (layout in the module docstring)."""
    log = log or (lambda msg: None)
    start = time.perf_counter()
    datas = {v: make_data(settings, v) for v in settings.variants}
    first = datas[settings.variants[0]]
    max_length = max(settings.length, settings.short_length)

    models, model_info = {}, {}
    for name, train_sets in (("pretrained", ("retain", "forget1")), ("retain_only", ("retain",))):
        t0 = time.perf_counter()
        train_seqs = np.concatenate([first[f"{s}_train"] for s in train_sets])
        seed = _sub_seed(settings.seed, 0 if name == "pretrained" else 1)
        log(f"training the {name.replace('_', '-')} model on {' + '.join(train_sets)} ({len(train_seqs)} sequences)")
        model = build_model(settings, max_length, seed)
        train_log = pretrain(model, train_seqs, settings, seed, progress, desc=name.replace("_", "-"))
        per_epoch = math.ceil(len(train_seqs) / settings.pretrain_batch_size)
        losses = [s["loss"] for s in train_log["steps"]]
        model_info[name] = {
            "trained_on": list(train_sets), "train_sequences": int(len(train_seqs)), "steps": len(losses),
            "train_loss_per_epoch": [float(np.mean(losses[i:i + per_epoch])) for i in range(0, len(losses), per_epoch)],
            "train_loss_last_step": losses[-1], "seconds": time.perf_counter() - t0}
        models[name] = model

    variants, info = {}, {}
    for v in settings.variants:
        data = datas[v]
        test = {s: list(data[f"{s}_test"]) for s in SETS}
        ref = {s: scored_log_probs(models["retain_only"], test[s], settings.eval_batch_size)[0] for s in SETS}

        def evaluate(model):
            return {f"kl_{s}": mean_token_kl(ref[s], scored_log_probs(model, test[s], settings.eval_batch_size)[0])
                    for s in SETS}

        checks = {}
        for name, model in models.items():
            scored = {s: scored_log_probs(model, test[s], settings.eval_batch_size) for s in SETS}
            checks[name] = {"test_nll": {s: mean_nll(*scored[s]) for s in SETS},
                            "kl_to_chain": {s: mean_token_kl(chain_log_probs(test[s], SUBSETS[s]), scored[s][0])
                                            for s in SETS}}
        checks["chain_entropy"] = {s: float(-(chain_log_probs(test[s], SUBSETS[s]).exp()
                                              * chain_log_probs(test[s], SUBSETS[s])).sum(-1).mean()) for s in SETS}
        forget_seqs = list(data["forget1_train"]) + list(data["forget2_train"])
        variants[v], info[v] = {}, {"forget2_length": settings.forget2_length(v), "forget_train_sequences":
                                    len(forget_seqs), "test_sequences": {s: len(test[s]) for s in SETS},
                                    "before_unlearning": evaluate(models["pretrained"]), "models": checks,
                                    "seconds": {}}
        for method in settings.methods:
            t0 = time.perf_counter()
            log(f"variant {v} (forget2 length {settings.forget2_length(v)}): {method}, {settings.steps} steps")
            model = build_model(settings, max_length, settings.seed)
            model.load_state_dict(models["pretrained"].state_dict())
            variants[v][method] = unlearn(model, method, forget_seqs, settings, _sub_seed(settings.seed, 2), evaluate,
                                          progress, desc=f"{v} {method}", start=info[v]["before_unlearning"])
            info[v]["seconds"][method] = time.perf_counter() - t0

    return {"markov": 1, "settings": _settings_json(settings),
            "chains": {"n_states": N_STATES, "subsets": {k: list(s) for k, s in SUBSETS.items()}, "within": WITHIN,
                       "transition_matrices": {k: transition_matrix(s).tolist() for k, s in SUBSETS.items()}},
            "kl": "per-token KL(retain-only model || model), mean over every scored position of the test set",
            "models": model_info, "variants": variants, "variant_info": info,
            "summary": summarize(variants, settings), "seconds": time.perf_counter() - start}


def _settings_json(settings: MarkovSettings) -> dict:
    s = asdict(settings)
    s.pop("extra")
    s["variants"], s["methods"] = list(settings.variants), list(settings.methods)
    s["forget2_lengths"] = {v: settings.forget2_length(v) for v in settings.variants}
    s.update(optimizer="AdamW (eps 1e-6, no weight decay, constant lr, no clipping)", retain_term=None,
             simnpo_gamma=0.0, model="transformers GPT2LMHeadModel (vocabulary = the 10 states)")
    return s


# --------------------------------------------------------------------------------------------------------- summary

def retain_kl_at(path: list[dict], key: str, level: float, rising: bool):
    """Retain KL where the forget-side KL `key` first reaches `level` along `path` (linear between steps), or None."""
    for a, b in zip(path, path[1:]):
        fa, fb = a[key], b[key]
        if (fb >= level if rising else fb <= level):
            if (fa >= level if rising else fa <= level):
                return a["kl_retain"]
            w = (level - fa) / (fb - fa)
            return a["kl_retain"] + w * (b["kl_retain"] - a["kl_retain"])
    return None


CLAIM = ("SimNPO moves the forget-side KL (to the retain-only model) as far as NPO does with less damage on the "
         "retain set: at the furthest forget-side KL both methods reach, SimNPO's retain KL is lower")


def summarize(variants: dict, settings: MarkovSettings) -> dict:
    """{"final": {variant: {method: KLs at the last step}}, "closest_to_retain_only": {variant: {method: {subset:
    the step where the forget-side KL is smallest, with the retain KL there}}}, "tradeoff": {variant: {subset:
    matched comparison}}, "claim": {"statement", "holds": {variant: {subset: bool | None}}, "holds_everywhere"}}.
    The comparison needs both npo and simnpo (else "tradeoff" is empty and the claim unchecked)."""
    keys = ("kl_retain", "kl_forget1", "kl_forget2")
    out = {"final": {v: {m: {k: path[-1][k] for k in keys} for m, path in methods.items()}
                     for v, methods in variants.items()},
           "closest_to_retain_only": {}, "tradeoff": {}}
    for v, methods in variants.items():
        out["closest_to_retain_only"][v] = {m: {s: _closest(path, f"kl_{s}") for s in ("forget1", "forget2")}
                                            for m, path in methods.items()}
        if {"npo", "simnpo"} <= set(methods):
            out["tradeoff"][v] = {s: _tradeoff(methods, f"kl_{s}") for s in ("forget1", "forget2")}
    holds = {v: {s: t.get("simnpo_less_retain_damage") for s, t in ts.items()} for v, ts in out["tradeoff"].items()}
    flat = [h for hs in holds.values() for h in hs.values()]
    out["claim"] = {"statement": CLAIM, "holds": holds,
                    "holds_everywhere": all(flat) if flat and None not in flat else None}
    return out


def _closest(path: list[dict], key: str) -> dict:
    best = min(path, key=lambda p: p[key])
    return {"step": best["step"], key: best[key], "kl_retain": best["kl_retain"]}


def _tradeoff(methods: dict, key: str) -> dict:
    """Matched comparison on one forget subset: both methods start from the same model; the direction of the
    forget-side move is the one both final points lie in (else the comparison is undefined); the level is the
    furthest forget-side KL both reach in that direction; at that level, the retain KL of each."""
    start = methods["npo"][0][key]
    moves = {m: methods[m][-1][key] - start for m in ("npo", "simnpo")}
    if moves["npo"] * moves["simnpo"] <= 0:
        return {"start": start, "final_change": moves, "comparable": False, "simnpo_less_retain_damage": None,
                "why": "the methods move the forget-side KL in opposite directions (or not at all)"}
    rising = moves["npo"] > 0
    reach = {m: (max if rising else min)(p[key] for p in methods[m]) for m in ("npo", "simnpo")}
    level = (min if rising else max)(reach.values())
    at = {m: retain_kl_at(methods[m], key, level, rising) for m in ("npo", "simnpo")}
    return {"start": start, "direction": "up" if rising else "down", "final_change": moves,
            "matched_level": level, "retain_kl_at_level": at, "comparable": True,
            "simnpo_less_retain_damage": at["simnpo"] < at["npo"]}


def summary_lines(result: dict) -> list[str]:
    summary = result["summary"]
    lines = [f"{'variant':<8}{'method':<8}{'kl_retain':>11}{'kl_forget1':>12}{'kl_forget2':>12}"]
    for v, finals in summary["final"].items():
        before = result["variant_info"][v]["before_unlearning"]
        for m, k in [("before", before)] + list(finals.items()):
            lines.append(f"{v:<8}{m:<8}{k['kl_retain']:>11.4f}{k['kl_forget1']:>12.4f}{k['kl_forget2']:>12.4f}")
        for s, t in summary["tradeoff"].get(v, {}).items():
            if t["comparable"]:
                at = t["retain_kl_at_level"]
                verdict = "SimNPO less" if t["simnpo_less_retain_damage"] else "NPO less (or equal)"
                lines.append(f"  {s}: where kl_{s} first gets {t['direction']} to {t['matched_level']:.4f}, retain KL "
                             f"npo {at['npo']:.4f} vs simnpo {at['simnpo']:.4f}: {verdict} retain damage")
            else:
                lines.append(f"  {s}: not comparable ({t['why']})")
    if summary["claim"]["holds_everywhere"] is not None:
        lines.append(f"claim ({CLAIM}): {'holds' if summary['claim']['holds_everywhere'] else 'does not hold'} "
                     "in every variant and forget subset")
    return lines


# ---------------------------------------------------------------------------------------------------------- figure

COLORS = {"npo": "#D55E00", "simnpo": "#0072B2"}  # Okabe–Ito vermillion and blue (colour-blind safe)
MARKERS = {"npo": "o", "simnpo": "s"}
LABELS = {"npo": "NPO", "simnpo": "SimNPO"}


def plot(result: dict, path) -> None:
    """Forget-side KL against retain KL along each unlearning path: one row per variant, one column per forget
    subset; the start (step 0, the pretrained model) is the black star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(result["variants"])
    fig, axes = plt.subplots(len(variants), 2, figsize=(10, 4.2 * len(variants)), squeeze=False)
    for row, v in enumerate(variants):
        length = result["variant_info"][v]["forget2_length"]
        for col, s in enumerate(("forget1", "forget2")):
            ax = axes[row][col]
            for m, steps in result["variants"][v].items():
                xs, ys = [p["kl_retain"] for p in steps], [p[f"kl_{s}"] for p in steps]
                every = max(1, len(steps) // 10)
                ax.plot(xs, ys, color=COLORS[m], marker=MARKERS[m], markevery=every, markersize=4, linewidth=1.5,
                        label=f"{LABELS[m]} (step 0–{steps[-1]['step']})")
            first = next(iter(result["variants"][v].values()))[0]
            ax.plot([first["kl_retain"]], [first[f"kl_{s}"]], marker="*", color="black", markersize=11,
                    linestyle="none", label="before unlearning")
            ax.set_xlabel("KL on retain test set (to the retain-only model)")
            ax.set_ylabel(f"KL on {s} test set (to the retain-only model)")
            ax.set_title(f"variant {v} (forget2 length {length}): {s}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("Unlearning forget1 + forget2 from the model pretrained on retain + forget1: per-token "
                 "KL(retain-only ‖ model)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
