"""Which prompt tokens to corrupt.

`entity` mode: tokens overlapping a name of the forget target. Names come from the user, or are extracted from the
forget set without any NER model: runs of two or more capitalised words (hyphenated parts allowed) that occur in at
least `min_rows` forget rows and in no negative text. A token is selected when its text overlaps a whole-word,
case-insensitive occurrence of a name or of one of the name's words (so "Abilov" alone also counts).

`all` mode: every prompt token except the last one of each row.
"""
from __future__ import annotations

import re
from collections import Counter

import torch

from ..errors import UserError

MODES = ("entity", "all")

# Capitalised words that start questions and sentences; stripped from the front of a candidate name.
_LEADING = set("""a an the in on at of for to by from with and or but is are was were be been do does did has have
had can could would should will may might what who whom whose which when where why how yes no this that these those
his her its their our my your as if it he she they we i please tell describe explain""".split())
_WORD = r"[A-Z][\w'\u00C0-\u024F]*(?:-[A-Z]?[\w\u00C0-\u024F]+)*"
_NAME_RUN = re.compile(rf"{_WORD}(?:\s+{_WORD})+")


def _candidates(text: str) -> set[str]:
    out = set()
    for match in _NAME_RUN.finditer(text):
        words = match.group(0).split()
        while words and words[0].lower() in _LEADING:
            words = words[1:]
        if len(words) >= 2:
            out.add(" ".join(w.removesuffix("'s").removesuffix("'") for w in words))
    return out


def extract_entities(forget_texts: list[str], negative_texts: list[str] = (), min_rows: int = 2) -> list[str]:
    """Names of the forget target found in the forget texts, most frequent first."""
    counts = Counter()
    for text in forget_texts:
        counts.update(_candidates(text))
    negatives = "\n".join(negative_texts).lower()
    names = [n for n, c in counts.most_common() if c >= min_rows and n.lower() not in negatives]
    return sorted(names, key=lambda n: (-counts[n], n))


def name_words(entities: list[str], min_len: int = 3) -> list[str]:
    """The names and their individual words (not function words, at least min_len characters), longest first."""
    words = set()
    for name in entities:
        name = name.strip()
        if not name:
            continue
        words.add(name)
        for w in name.split():
            if len(w) >= min_len and w.lower() not in _LEADING:
                words.add(w)
    return sorted(words, key=lambda w: (-len(w), w))


class TokenSelector:
    """Turns (input_ids, prompt_mask) into the bool mask of tokens to corrupt, for one mode and entity list."""

    def __init__(self, tokenizer, mode: str = "entity", entities: list[str] = ()):
        if mode not in MODES:
            raise UserError(f"--mode: unknown value {mode!r}; choose entity or all")
        self.tokenizer, self.mode, self.entities = tokenizer, mode, list(entities)
        words = name_words(self.entities)
        self._pattern = (re.compile(r"(?<!\w)(?:" + "|".join(re.escape(w) for w in words) + r")(?!\w)",
                                    re.IGNORECASE) if words else None)
        self._piece_cache: dict[int, str] = {}

    def _piece(self, token_id: int) -> str:
        if token_id not in self._piece_cache:
            self._piece_cache[token_id] = self.tokenizer.decode([token_id])
        return self._piece_cache[token_id]

    def entity_positions(self, ids: list[int]) -> list[int]:
        """Indices into `ids` of tokens whose decoded text overlaps a name occurrence."""
        if self._pattern is None:
            return []
        starts, text = [], ""
        for t in ids:
            starts.append(len(text))
            text += self._piece(t)
        ends = starts[1:] + [len(text)]
        hits = set()
        for m in self._pattern.finditer(text):
            hits.update(i for i, (s, e) in enumerate(zip(starts, ends)) if s < m.end() and e > m.start())
        return sorted(hits)

    def select(self, input_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """Bool [B, T]: tokens to corrupt in each row (a subset of prompt_mask).

        In entity mode a row whose prompt mentions no name falls back to `all` mode: the classifier flagged it as
        about the forget target (e.g. a paraphrase that avoids the name), so it must still be corrupted.
        """
        prompt_mask = prompt_mask.bool()
        out = torch.zeros_like(prompt_mask)
        for row in range(input_ids.shape[0]):
            pos = prompt_mask[row].nonzero(as_tuple=True)[0]
            if len(pos) == 0:
                continue
            if self.mode == "entity":
                hits = self.entity_positions(input_ids[row, pos].tolist())
                if hits:
                    out[row, pos[hits]] = True
                    continue
            out[row, pos[:-1]] = True  # all prompt tokens except the last
        return out
