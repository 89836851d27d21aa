"""Evaluation conventions: how a (question, answer) pair is rendered and labelled, what the model may attend to, how
generations and gold answers are decoded, and the small constants of the metric formulas.

Two sets, chosen with `--compat` (API `compat=`):
- `unlearnkit` (default): format.py's rendering (answer + end-of-turn labelled, prompt and answer tokenised
  apart), attention over every real token, ES/EM/MIA over all labelled tokens, gold answers as given.
- `open-unlearning`: the conventions of open-unlearning's stock TOFU evaluation (docs/evaluation.md, "Differences
  from open-unlearning", names the file of the framework each one comes from), so the same model gives its numbers.

Everything that differs is a field here; the evaluators read fields, never the set's name.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..data.format import IGNORE, PromptFormat, encode_prompt, encode_qa, prompt_text
from ..errors import UserError

COMPAT_CHOICES = ("unlearnkit", "open-unlearning")

# open-unlearning's prompt for models without a chat template (its configs/model/phi-1_5.yaml template_args) and the
# max_length of its TOFU dataset configs; only that non-chat path truncates.
PLAIN_TAGS = ("Question: ", "\n", "Answer: ")
PLAIN_MAX_LENGTH = 512


@dataclass(frozen=True)
class Conventions:
    name: str
    # Render question + answer as one conversation, tokenise it whole, label every token after the separately
    # tokenised generation prompt, and append EOS when the last token is not EOS (so a chat template's trailing
    # newline after the end-of-turn is labelled, followed by one more EOS).
    whole_conversation: bool
    # attention_mask = input_ids != pad id: with pad == EOS (SmolLM2, Llama, Qwen) every end-of-turn token inside
    # the sequence is invisible to attention, in teacher forcing and in generation.
    hide_pad_tokens: bool
    # ES, EM, Min-K% and Min-K%++ skip the last labelled token (the framework drops it as "the EOS prediction").
    drop_last_label: bool
    es_convention: str           # metrics.ES_CONVENTIONS
    decode_cleanup: bool | None  # clean_up_tokenization_spaces when decoding text; None: the tokenizer's default
    # ROUGE's gold text: the decoded labelled conversation with the decoded prompt removed, stripped (else the answer)
    gold_from_tokens: bool
    zlib_from_tokens: bool       # ZLib's text: the decoded labelled tokens (else the answer)
    eps: float                   # added to the denominators of truth ratio, normalised probability and PrivLeak
    minkpp_var_floor: float      # Min-K%++: variances are clamped to at least this
    privleak: str                # "muse": (AUC - AUC_ret)/AUC_ret; "one-minus-auc": the same on 1 - AUC
    privleak_default_ref_auc: float | None  # retain AUC assumed without a retain reference (None: PrivLeak null)
    # The ES convention and the tofu headline truth ratio belong to these conventions: another explicit choice is
    # refused (else --es-convention / --truth-ratio choose freely).
    pinned: bool

    # ---- rendering and labelling ----------------------------------------------------------------------------------

    def encode_qa(self, tokenizer, question: str, answer: str, fmt: PromptFormat = PromptFormat()) -> dict:
        if not self.whole_conversation:
            return encode_qa(tokenizer, question, answer, fmt)
        full, prompt = _whole_ids(tokenizer, question, answer, fmt)
        return {"input_ids": full, "labels": [IGNORE] * len(prompt) + full[len(prompt):]}

    def encode_prompt(self, tokenizer, question: str, fmt: PromptFormat = PromptFormat()) -> list[int]:
        if not self.whole_conversation:
            return encode_prompt(tokenizer, question, fmt)
        return _whole_ids(tokenizer, question, None, fmt)[1]

    def prompt_text(self, tokenizer, question: str, fmt: PromptFormat = PromptFormat()) -> str:
        """The prompt as text (what a guard is shown)."""
        if not self.whole_conversation:
            return prompt_text(tokenizer, question, fmt)
        return _whole_texts(tokenizer, question, "", fmt)[1]

    def hidden_token(self, tokenizer) -> int | None:
        """The token id attention never sees (None: every real token is seen)."""
        if not self.hide_pad_tokens:
            return None
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # ---- text ------------------------------------------------------------------------------------------------------

    def decode(self, tokenizer, ids) -> str:
        kw = {} if self.decode_cleanup is None else {"clean_up_tokenization_spaces": self.decode_cleanup}
        return tokenizer.decode(list(ids), skip_special_tokens=True, **kw)

    def gold_text(self, tokenizer, answer: str, example: dict, prompt_ids: list[int]) -> str:
        """The reference ROUGE compares a generation with."""
        if not self.gold_from_tokens:
            return answer
        # The whole conversation decoded, minus the decoded prompt (str.replace, as the framework does).
        return self.decode(tokenizer, example["input_ids"]).replace(self.decode(tokenizer, prompt_ids), "").strip()

    def zlib_text(self, tokenizer, answer: str, example: dict) -> str:
        if not self.zlib_from_tokens:
            return answer
        return tokenizer.decode([t for t in example["labels"] if t != IGNORE], skip_special_tokens=True)

    # ---- per-token statistics -------------------------------------------------------------------------------------

    def scored(self, values):
        """The labelled-token values ES, EM and the token-wise MIA scores use."""
        return values if values is None or not self.drop_last_label else values[:-1]


UNLEARNKIT = Conventions(name="unlearnkit", whole_conversation=False, hide_pad_tokens=False, drop_last_label=False,
                         es_convention="unlearnkit", decode_cleanup=None, gold_from_tokens=False,
                         zlib_from_tokens=False, eps=0.0, minkpp_var_floor=1e-12, privleak="muse",
                         privleak_default_ref_auc=None, pinned=False)
OPEN_UNLEARNING = Conventions(name="open-unlearning", whole_conversation=True, hide_pad_tokens=True,
                              drop_last_label=True, es_convention="open-unlearning", decode_cleanup=True,
                              gold_from_tokens=True, zlib_from_tokens=True, eps=1e-10, minkpp_var_floor=1e-6,
                              privleak="one-minus-auc", privleak_default_ref_auc=0.5, pinned=True)
_BY_NAME = {c.name: c for c in (UNLEARNKIT, OPEN_UNLEARNING)}


def conventions(compat: str | Conventions | None) -> Conventions:
    """The conventions named by --compat (None: the default)."""
    if isinstance(compat, Conventions):
        return compat
    if compat is None:
        return UNLEARNKIT
    if compat not in _BY_NAME:
        raise UserError(f"--compat: unknown value {compat!r}; choose one of {', '.join(COMPAT_CHOICES)}")
    return _BY_NAME[compat]


def resolve_es_convention(conv: Conventions, es_convention: str | None) -> str:
    """An explicit --es-convention must agree with --compat open-unlearning (which fixes it); None: the set's own."""
    if es_convention is None:
        return conv.es_convention
    if conv.pinned and es_convention != conv.es_convention:
        raise UserError(f"--es-convention {es_convention} conflicts with --compat {conv.name} (which computes ES "
                        f"the {conv.es_convention} way); drop one of them")
    return es_convention


# ---- open-unlearning's whole-conversation rendering --------------------------------------------------------------

def _whole_texts(tokenizer, question: str, answer: str, fmt: PromptFormat) -> tuple[str, str]:
    """(prompt + answer, prompt) as text. Chat: the template applied to [system?, user, assistant] and, with the
    generation prompt, to [system?, user]; no system message unless one is given, so a template's default system
    prompt (SmolLM2's) is injected. Plain: 'Question: q\\nAnswer: ' + answer, after the system prompt verbatim."""
    if fmt.kind == "plain":
        prompt = (fmt.system_prompt or "") + PLAIN_TAGS[0] + question + PLAIN_TAGS[1] + PLAIN_TAGS[2]
        return prompt + answer, prompt
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; "
                        "use --prompt-format plain")
    chat = [{"role": "system", "content": fmt.system_prompt}] if fmt.system_prompt else []
    chat.append({"role": "user", "content": question})
    prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(chat + [{"role": "assistant", "content": answer}], tokenize=False,
                                         add_generation_prompt=False)
    return full, prompt


def _whole_ids(tokenizer, question: str, answer: str | None, fmt: PromptFormat) -> tuple[list[int], list[int]]:
    """(full ids with EOS appended when missing, prompt ids). Chat text is tokenised without special tokens (as
    apply_chat_template(tokenize=True) does); plain text with them, cut at PLAIN_MAX_LENGTH tokens on the right."""
    full_text, prompt_text_ = _whole_texts(tokenizer, question, answer or "", fmt)
    if fmt.kind == "plain":
        tok = lambda s: tokenizer(s, add_special_tokens=True, max_length=PLAIN_MAX_LENGTH,
                                  truncation=True)["input_ids"]
    else:
        tok = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
    prompt = tok(prompt_text_)
    if answer is None:
        return [], prompt
    full = tok(full_text)
    if tokenizer.eos_token_id is not None and (not full or full[-1] != tokenizer.eos_token_id):
        full = full + [tokenizer.eos_token_id]
    return full, prompt

