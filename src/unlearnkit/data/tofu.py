"""TOFU (Task of Fictitious Unlearning; Maini et al., 2024, MIT licence): bundled files, splits and the mini subset.

200 fictitious authors, 20 QA each; author k is rows 20k..20k+19 of full.json. forget01/05/10 are the last
2/10/20 authors. retain_perturbed (paraphrased + perturbed answers) covers the first 20 authors.

`mini` — sized for a 2-core CPU demo (prepare + unlearn + evaluate in <= 15 min):
- forget: the last 2 authors (= forget01, so forget01_perturbed gives its paraphrased/perturbed answers),
- retain: authors 0 and 1 (inside retain_perturbed, so retain truth ratio stays defined),
- holdout (never trained on, for membership inference): authors 196 and 197, of the same distribution,
- real_authors and world_facts unchanged.
The target model trains on forget + retain (80 QA), the retain model on retain only (40 QA).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..errors import UserError

QA_PER_AUTHOR = 20
N_AUTHORS = 200
SPLITS = ("forget01", "forget05", "forget10", "mini")
FILES = ("full", "forget01", "forget05", "forget10", "retain90", "retain95", "retain99",
         "forget01_perturbed", "forget05_perturbed", "forget10_perturbed", "retain_perturbed",
         "real_authors", "real_authors_perturbed", "world_facts", "world_facts_perturbed")

MINI_FORGET_AUTHORS = (198, 199)
MINI_RETAIN_AUTHORS = (0, 1)
MINI_HOLDOUT_AUTHORS = (196, 197)


def data_dir() -> Path:
    return Path(str(resources.files("unlearnkit") / "data" / "tofu_files"))


def load(name: str) -> list[dict]:
    """One bundled TOFU file by name (e.g. "forget10_perturbed", "real_authors"). Rows get "index" (row number)
    and, where the file is aligned with full.json, "author"."""
    if name not in FILES:
        raise UserError(f"TOFU: unknown file {name!r}; choose one of {', '.join(FILES)}")
    rows = [json.loads(line) for line in (data_dir() / f"{name}.json").read_text(encoding="utf-8").splitlines() if line.strip()]
    first_row = _first_full_row(name, len(rows))
    for i, row in enumerate(rows):
        row["index"] = i
        if first_row is not None:
            row["author"] = (first_row + i) // QA_PER_AUTHOR
    return rows


def _first_full_row(name: str, n: int) -> int | None:
    """Row of full.json where this file starts (files are contiguous author blocks), or None if unrelated."""
    base = name.removesuffix("_perturbed")
    if base.startswith("forget"):
        return N_AUTHORS * QA_PER_AUTHOR - n
    if base in ("full", "retain90", "retain95", "retain99") or name == "retain_perturbed":
        return 0
    return None


def authors(rows: list[dict], wanted) -> list[dict]:
    wanted = set(wanted)
    return [r for r in rows if r.get("author") in wanted]


@dataclass
class TofuTask:
    """Everything one TOFU split needs: what the target/retain models train on, and the evaluation sets."""
    split: str
    train_target: list[dict]
    train_retain: list[dict]
    forget: list[dict]            # forget QA with paraphrased/perturbed answers (evaluation + unlearning)
    retain_eval: list[dict]       # retain QA with paraphrased/perturbed answers
    real_authors: list[dict]
    world_facts: list[dict]
    holdout: list[dict] = field(default_factory=list)  # never-trained QA of the same distribution (MIA)
    retain_train_for_unlearning: list[dict] = field(default_factory=list)

    def eval_sets(self) -> dict[str, list[dict]]:
        return {"forget": self.forget, "retain": self.retain_eval,
                "real_authors": self.real_authors, "world_facts": self.world_facts}


def task(split: str) -> TofuTask:
    """The TOFU protocol for one split: forget01/05/10 (full 4000 QA) or mini."""
    if split not in SPLITS:
        raise UserError(f"--split: unknown value {split!r}; choose one of {', '.join(SPLITS)}")
    ra, wf = load("real_authors_perturbed"), load("world_facts_perturbed")
    if split == "mini":
        full = load("full")
        forget = load("forget01_perturbed")
        retain = authors(full, MINI_RETAIN_AUTHORS)
        return TofuTask(split=split,
                        train_target=retain + authors(full, MINI_FORGET_AUTHORS),
                        train_retain=retain,
                        forget=forget,
                        retain_eval=authors(load("retain_perturbed"), MINI_RETAIN_AUTHORS),
                        real_authors=ra, world_facts=wf,
                        holdout=authors(full, MINI_HOLDOUT_AUTHORS),
                        retain_train_for_unlearning=retain)
    pct = split.removeprefix("forget")
    retain_name = f"retain{100 - int(pct)}"
    return TofuTask(split=split, train_target=load("full"), train_retain=load(retain_name),
                    forget=load(f"{split}_perturbed"), retain_eval=load("retain_perturbed"),
                    real_authors=ra, world_facts=wf, holdout=[],
                    retain_train_for_unlearning=load(retain_name))
