"""OpenAI-compatible server for a model with an optional ECO guard (`unlearnkit serve`)."""
from .app import BackgroundServer, Generator, create_app

__all__ = ["BackgroundServer", "Generator", "create_app", "build_app"]


def build_app(model_dir=None, eco=None, *, model_name=None, dtype=None, device=None, max_tokens_limit=512,
              max_queue=64, trust_remote_code=False):
    """Load the model (and guard) and return (app, generator)."""
    from pathlib import Path

    from ..models import DEFAULT_MODEL, load_model

    if eco is not None:
        from ..eco.guard import read_artifact

        read_artifact(eco)  # a bad artifact fails before the model loads
    model, tokenizer = load_model(model_dir, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    guard = None
    if eco is not None:
        from ..eco.guard import EcoGuard

        guard = EcoGuard.load(eco, model, tokenizer)
        guard.classifier.scores(["warm-up"])  # load the sentence encoder now, not on the first request
    name = model_name or (Path(model_dir).name if model_dir and Path(model_dir).exists() else str(model_dir or DEFAULT_MODEL))
    gen = Generator(model, tokenizer, guard, name, max_tokens_limit)
    return create_app(gen, max_queue), gen
