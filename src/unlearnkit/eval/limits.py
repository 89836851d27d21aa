"""Range checks shared by the evaluators and the eval CLI: numeric options, and sequence lengths against --max-length
and the model's context. The CLI runs them with the tokenizer and the model's config.json before any weights are
loaded; the evaluators run them again on what they were given (API callers get the same errors)."""
from __future__ import annotations

from ..errors import UserError

GEN_MEMORY_GB = 2.0  # default budget for the decoding batch's KV cache and activations (`--gen-memory-gb`)

# config.json fields that hold the longest sequence a model was built for, by architecture family.
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx",
                  "max_seq_len")


def at_least(value, minimum: int, name: str, none_ok: bool = False) -> None:
    """An integer option must be >= minimum (None allowed only when none_ok). `name`: a CLI option ("--limit"), an
    API keyword ("batch_size": its CLI option is named beside it), or a text naming both."""
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        shown = f"{name} (--{name.replace('_', '-')})" if name.isidentifier() else name
        raise UserError(f"{shown} {value!r}: must be an integer of at least {minimum}")


def check_memory_gb(value, name: str = "gen_memory_gb (--gen-memory-gb)") -> None:
    """A memory budget must be a finite number of GiB above 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise UserError(f"{name} {value!r}: must be a number of GiB above 0")


def context_length(config) -> int | None:
    """The model's context in tokens from its config (object or dict); None when the config does not say."""
    if config is None:
        return None
    get = config.get if isinstance(config, dict) else (lambda k: getattr(config, k, None))
    for field in CONTEXT_FIELDS:
        value = get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def model_context(path, trust_remote_code: bool = False, option: str = "--model") -> int | None:
    """Context length read from a model's config.json alone (no weights)."""
    from transformers import AutoConfig

    from ..models import resolve_model_path

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"{option} {path}: cannot read its config ({str(e).splitlines()[0] if str(e) else e})") from e
    return context_length(config)


def check_sequences(lengths, where, *, max_length: int | None, context: int | None, what: str = "sequence") -> None:
    """Every teacher-forced sequence fits --max-length and the model's context; else name the first that does not.
    lengths[i] is the token count of the sequence described by where(i)."""
    limits = [(lim, name) for lim, name in ((max_length, f"--max-length {max_length}"),
                                            (context, f"the model's context of {context} tokens")) if lim]
    for i, n in enumerate(lengths):
        for lim, name in limits:
            if n > lim:
                raise UserError(f"{where(i)}: {what} has {n} tokens, more than {name}")


def check_generation(prompt_lengths, where, *, max_new_tokens: int, context: int | None,
                     option: str = "--max-new-tokens") -> None:
    """Longest prompt + max_new_tokens must fit the model's context: a larger value could never be honoured."""
    if not context or not prompt_lengths:
        return
    i = max(range(len(prompt_lengths)), key=lambda j: prompt_lengths[j])
    longest = prompt_lengths[i]
    if longest + max_new_tokens > context:
        room = context - longest
        hint = f"at most {room}" if room >= 1 else "the prompt alone fills it"
        raise UserError(f"{option} {max_new_tokens}: the longest prompt ({where(i)}, {longest} tokens) plus the new "
                        f"tokens exceeds the model's context of {context} tokens; {hint}")
