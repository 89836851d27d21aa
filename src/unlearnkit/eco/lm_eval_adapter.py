"""lm-evaluation-harness model `unlearnkit-eco`: a Hugging Face model behind an ECO artifact.

    unlearnkit-lm-eval --model unlearnkit-eco --model_args pretrained=DIR,eco=ARTIFACT --tasks wmdp_bio,mmlu

(`unlearnkit-lm-eval` is lm_eval's own command line with this model registered: eco/harness.py.) From Python,
importing this module registers the model: `lm_eval.simple_evaluate(model="unlearnkit-eco", model_args=...)`.

Built on lm_eval's HFLM, so tokenisation, batching, truncation and scoring stay the harness's. What changes: every
forward that scores (context, continuation) pairs runs inside `EcoGuard.arm(input_ids, prompt_mask, prompts)` with
prompt_mask = the context's tokens in each row (never the continuation being scored), and every generation's prefill
runs inside it with the left-padded context's attention mask — as `unlearnkit eval ... --eco` does. The guard's
classifier reads each request's context text (chat or plain wrappers of the artifact's prompt format stripped);
each distinct context is classified once.
"""
from __future__ import annotations

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..errors import UserError
from .guard import EcoGuard, read_artifact

MODEL_NAME = "unlearnkit-eco"


def _row_key(tokens) -> tuple:
    """A model input row without trailing 0s: HFLM right-pads its rows with 0, so this is how a row is recognised."""
    n = len(tokens)
    while n and tokens[n - 1] == 0:
        n -= 1
    return tuple(tokens[:n])


def _unambiguous_parts(items: list[tuple[tuple, tuple]]) -> list[list[int]]:
    """Split [(row key, guard settings)] into groups of indices in which a key has one setting. Two requests can
    make the same model row with different contexts (context "a b" + "c" vs "a" + "b c"); the harness would score
    them from one forward, the guard must not."""
    parts: list[tuple[list[int], dict]] = []
    for i, (key, info) in enumerate(items):
        for members, seen in parts:
            if seen.setdefault(key, info) == info:
                members.append(i)
                break
        else:
            parts.append(([i], {key: info}))
    return [members for members, _ in parts]


@register_model(MODEL_NAME)
class EcoHFLM(HFLM):
    """HFLM whose prompts go through an ECO guard. Model args: everything HFLM takes, plus eco=ARTIFACT_DIR."""

    def __init__(self, pretrained, eco=None, **kwargs):
        if not eco:
            raise UserError(f"--model {MODEL_NAME}: name the ECO artifact in --model_args, e.g. "
                            "pretrained=DIR,eco=ARTIFACT_DIR")
        read_artifact(str(eco))  # a damaged artifact is refused before the model loads
        super().__init__(pretrained=pretrained, **kwargs)
        if self.backend != "causal":
            raise UserError(f"--model {MODEL_NAME}: ECO guards causal LMs only, not {self.backend} models")
        self.guard = EcoGuard.load(str(eco), self.model, self.tokenizer, device=str(self.device))
        self._rows: dict | None = None        # row key -> (context tokens in the row, flagged, context text)
        self._contexts: list[str] | None = None  # the generation batch being encoded

    # -- loglikelihood: one guarded forward per harness batch ----------------------------------------------------
    def _row(self, request) -> tuple[tuple, int, str]:
        """(row key, number of context tokens in the row, context text) of one (strings, context, continuation)
        request, for the row HFLM._loglikelihood_tokens builds: (context + continuation)[-(max_length + 1):][:-1]."""
        strings, context, continuation = request
        whole = context + continuation
        row = whole[-(self.max_length + 1):][:-1]
        cut = len(whole) - 1 - len(row)  # tokens truncated from the left
        text = strings[0] if strings is not None else self.tokenizer.decode(context)  # rolling windows: no text
        return _row_key(row), max(0, len(context) - cut), text

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        rows = [self._row(r) for r in requests]
        texts = list(dict.fromkeys(text for _, _, text in rows))
        flagged = dict(zip(texts, self.guard.flags(texts)))
        results = [None] * len(requests)
        for part in _unambiguous_parts([(key, (n, flagged[text])) for key, n, text in rows]):
            self._rows = {rows[i][0]: (rows[i][1], flagged[rows[i][2]], rows[i][2]) for i in part}
            try:
                out = super()._loglikelihood_tokens([requests[i] for i in part], disable_tqdm, override_bs)
            finally:
                self._rows = None
            for i, value in zip(part, out):
                results[i] = value
        return results

    def _model_call(self, inps, attn_mask=None, labels=None):
        if self._rows is None:
            return super()._model_call(inps, attn_mask, labels)
        prompt_mask = torch.zeros(inps.shape, dtype=torch.bool)
        flags, prompts = [], []
        for b, tokens in enumerate(inps.tolist()):
            found = self._rows.get(_row_key(tokens))
            if found is None:
                raise RuntimeError(f"{MODEL_NAME}: a model input that is no request's context + continuation "
                                   "(this lm_eval version builds its batches differently)")
            n, flag, text = found
            prompt_mask[b, :n] = True
            flags.append(flag)
            prompts.append(text)
        with self.guard.arm(inps, prompt_mask, prompts, flags):
            return super()._model_call(inps, attn_mask, labels)

    def _detect_batch_size(self, requests=None, pos: int = 0):
        rows, self._rows = self._rows, None  # the probing forwards are synthetic: no guard
        try:
            return super()._detect_batch_size(requests, pos)
        finally:
            self._rows = rows

    # -- generation: the prefill is guarded, decoding is not (EcoGuard.arm) -----------------------------------
    def tok_batch_encode(self, strings, *args, **kwargs):
        self._contexts = list(strings)  # generate_until encodes each batch's contexts right before generating it
        return super().tok_batch_encode(strings, *args, **kwargs)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        contexts, self._contexts = self._contexts, None
        prompts = contexts if contexts is not None and len(contexts) == context.shape[0] else None
        mask = generation_kwargs.get("attention_mask")
        prompt_mask = mask.bool() if mask is not None else torch.ones_like(context, dtype=torch.bool)
        with self.guard.arm(context, prompt_mask.cpu(), prompts):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
