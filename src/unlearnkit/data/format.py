"""Prompt formatting and tokenisation of (question, answer) pairs.

Two formats:
- "chat": the model's own chat template. The system prompt is off by default (sequences stay short); templates that
  inject a default system prompt into the first turn (SmolLM2, Llama-3.1) are rendered as a later turn instead, which
  carries no injected system text.
- "plain": "Question: {q}\nAnswer:" + " {a}" + EOS, for base models without a template.

Labels cover the answer tokens and the end-of-turn token only; the prompt is masked with -100.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError

IGNORE = -100
_PROBE_Q, _PROBE_A = "\x01probe question\x01", "\x02probe answer\x02"


@dataclass(frozen=True)
class PromptFormat:
    kind: str = "chat"  # "chat" | "plain"
    system_prompt: str | None = None

    def __post_init__(self):
        if self.kind not in ("chat", "plain"):
            raise UserError(f"--prompt-format: unknown value {self.kind!r}; choose chat or plain")


@dataclass(frozen=True)
class _ChatPieces:
    prefix: str       # text before the question (incl. system prompt, if any)
    middle: str       # text between question and answer (e.g. "<|im_end|>\n<|im_start|>assistant\n")
    end_of_turn: str  # text that closes the answer (e.g. "<|im_end|>"), labelled


def chat_pieces(tokenizer, system_prompt: str | None) -> _ChatPieces:
    key = (id(tokenizer), system_prompt)
    if key not in _PIECES_CACHE:
        _PIECES_CACHE[key] = _derive_chat_pieces(tokenizer, system_prompt)
    return _PIECES_CACHE[key]


_PIECES_CACHE: dict = {}


def _derive_chat_pieces(tokenizer, system_prompt: str | None) -> _ChatPieces:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; "
                        "use --prompt-format plain")
    render = lambda msgs, gen: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    user = {"role": "user", "content": _PROBE_Q}
    assistant = {"role": "assistant", "content": _PROBE_A}
    if system_prompt is None:
        # Render the probe as a second turn: templates inject their default system prompt only into the first.
        opener = [{"role": "user", "content": "\x03"}, {"role": "assistant", "content": "\x04"}]
        before = render(opener, False)
        with_prompt = render(opener + [user], True)
        with_answer = render(opener + [user, assistant], False)
        if not with_prompt.startswith(before):
            raise UserError(f"tokenizer {tokenizer.name_or_path!r}: chat template is not prefix-stable; "
                            "use --prompt-format plain or set a system prompt")
        prompt_text, answer_text = with_prompt[len(before):], with_answer[len(before):]
    else:
        sys_msg = [{"role": "system", "content": system_prompt}]
        prompt_text, answer_text = render(sys_msg + [user], True), render(sys_msg + [user, assistant], False)
    q_at = prompt_text.index(_PROBE_Q)
    prefix, middle = prompt_text[:q_at], prompt_text[q_at + len(_PROBE_Q):]
    if not answer_text.startswith(prompt_text[:q_at] + _PROBE_Q):
        raise UserError(f"tokenizer {tokenizer.name_or_path!r}: chat template renders the answer turn "
                        "inconsistently; use --prompt-format plain")
    a_at = answer_text.index(_PROBE_A)
    end_of_turn = answer_text[a_at + len(_PROBE_A):].rstrip()  # keep "<|im_end|>", drop the trailing newline
    return _ChatPieces(prefix, middle, end_of_turn)


def prompt_text(tokenizer, question: str, fmt: PromptFormat = PromptFormat()) -> str:
    """The text the model sees before its answer."""
    if fmt.kind == "plain":
        return f"Question: {question}\nAnswer:"
    pieces = chat_pieces(tokenizer, fmt.system_prompt)
    return pieces.prefix + question + pieces.middle


def answer_text(tokenizer, answer: str, fmt: PromptFormat = PromptFormat()) -> str:
    """The labelled continuation: the answer and the end-of-turn marker."""
    if fmt.kind == "plain":
        return " " + answer + (tokenizer.eos_token or "")
    return answer + chat_pieces(tokenizer, fmt.system_prompt).end_of_turn


def encode_prompt(tokenizer, question: str, fmt: PromptFormat = PromptFormat()) -> list[int]:
    # BOS (if the tokenizer adds one) goes in front of the prompt only.
    return tokenizer(prompt_text(tokenizer, question, fmt), add_special_tokens=True)["input_ids"]


def encode_qa(tokenizer, question: str, answer: str, fmt: PromptFormat = PromptFormat()) -> dict:
    """Token ids and labels for one pair: {"input_ids": [...], "labels": [...]} (labels -100 on the prompt).

    Prompt and answer are tokenised separately so the boundary is exact; the answer ids are what the model must
    produce after the prompt (same as generation sees).
    """
    prompt_ids = encode_prompt(tokenizer, question, fmt)
    answer_ids = encode_answer(tokenizer, answer, fmt)
    return {"input_ids": prompt_ids + answer_ids, "labels": [IGNORE] * len(prompt_ids) + answer_ids}


def encode_answer(tokenizer, answer: str, fmt: PromptFormat = PromptFormat()) -> list[int]:
    """The labelled ids of an answer: answer + end-of-turn (chat) or + EOS (plain), tokenised on its own."""
    answer_ids = tokenizer(answer_text(tokenizer, answer, fmt), add_special_tokens=False)["input_ids"]
    if fmt.kind == "plain" and tokenizer.eos_token_id is not None and (
            not answer_ids or answer_ids[-1] != tokenizer.eos_token_id):
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    return answer_ids


def conversation_text(tokenizer, messages: list[dict], fmt: PromptFormat = PromptFormat()) -> str:
    """The prompt text of a conversation (usually ending with a user turn), in the format's rendering (what the model sees
    before its answer). One user message gives exactly `prompt_text`. Longer conversations follow the same rules:
    with no system prompt in the format and none in the messages, they are rendered as later turns (no default
    system prompt injected by the template); the format's system prompt is used when the messages have none; a
    system message of their own is kept."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return prompt_text(tokenizer, messages[0]["content"], fmt)
    if fmt.kind == "plain":
        turns = {"system": "{}\n", "user": "Question: {}\nAnswer:", "assistant": " {}\n"}
        text = "".join(turns[m["role"]].format(m["content"]) for m in messages)
        return text if messages[-1]["role"] == "user" else text + "Answer:"
    render = lambda msgs: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    if messages[0]["role"] == "system":
        return render(messages)
    if fmt.system_prompt is not None:
        return render([{"role": "system", "content": fmt.system_prompt}] + messages)
    # As for one question: after an opening exchange the template adds no system prompt.
    opener = [{"role": "user", "content": "\x03"}, {"role": "assistant", "content": "\x04"}]
    before = tokenizer.apply_chat_template(opener, tokenize=False, add_generation_prompt=False)
    full = render(opener + messages)
    if not full.startswith(before):
        raise UserError(f"tokenizer {tokenizer.name_or_path!r}: chat template is not prefix-stable; use a "
                        "system message or --prompt-format plain")
    return full[len(before):]


def encode_conversation(tokenizer, messages: list[dict], fmt: PromptFormat = PromptFormat()) -> list[int]:
    """Token ids of `conversation_text` (BOS, if the tokenizer adds one, in front)."""
    return tokenizer(conversation_text(tokenizer, messages, fmt), add_special_tokens=True)["input_ids"]


def encode_text(tokenizer, text: str) -> dict:
    """Raw text (corpora for MUSE/WMDP-style forget sets): every token after the first is labelled."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return {"input_ids": ids, "labels": [IGNORE] + ids[1:]}
