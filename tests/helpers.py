"""Small helpers several test files share (importable because pytest puts tests/ on sys.path)."""
from __future__ import annotations

from unlearnkit.cli import main


def cli_error(args, capsys) -> str:
    """Run the CLI in-process; assert it failed with exit 2 and ONE line on stderr; return that line."""
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("unlearnkit: error:") and "\n" not in err, (code, err)
    return err


def layer_outputs_by_hand(model, ids, n: int) -> list:
    """Outputs of the first n decoder layers of a Llama-style model for one unpadded row `ids` [1, T], computed
    layer by layer from its modules (the plain definition of h_l the analyses are checked against)."""
    import torch

    inner = model.model
    with torch.no_grad():
        h = inner.embed_tokens(ids)
        pos = torch.arange(ids.shape[1])[None]
        emb = inner.rotary_emb(h, pos)
        outs = []
        for layer in inner.layers[:n]:
            h = layer(h, position_embeddings=emb, position_ids=pos)
            h = h[0] if isinstance(h, tuple) else h
            outs.append(h)
    return outs
