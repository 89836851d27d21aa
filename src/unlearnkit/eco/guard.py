"""EcoGuard: a model + tokenizer whose prompts about the forget target get corrupted input embeddings.

Contract (the evaluation module and the server rely on it):

    with guard.arm(input_ids, prompt_mask, prompts):
        model(...)            # teacher-forced: the one forward is corrupted
        model.generate(...)   # generation: only the first forward (prefill) is corrupted; decoding is untouched

`prompt_mask` is bool [B, T], true on prompt tokens (for left-padded generation: the attention mask). `prompts` are
the prompt strings, one per row (raw questions, or the formatted prompt text: chat/plain wrappers are stripped
before classification). Rows the classifier flags get the selected tokens (entity/all mode ∩ prompt_mask)
corrupted; other rows and all non-prompt tokens are left exactly as they were.

The hook is registered on the input-embedding module only while armed, so an unarmed model is unchanged.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..data.format import IGNORE, PromptFormat, chat_pieces, encode_conversation, encode_prompt, prompt_text
from ..errors import UserError
from ..files import check_out_dir, publish_dir, temp_dir_beside, write_json_atomic
from .classifier import PromptClassifier
from .corrupt import CorruptionConfig
from .entities import MODES, TokenSelector

ARTIFACT_VERSION = 1
ARTIFACT_KIND = "eco fit"  # the output-folder kind (files.py) of an artifact folder
CONFIG_FILE, CLASSIFIER_FILE, METRICS_FILE, SEARCH_FILE = "eco.json", "classifier.json", "metrics.json", "search.json"


@dataclass
class ArmState:
    flags: list[bool]
    selected: torch.Tensor   # bool [B, T]: tokens that will be corrupted
    fired: int = 0           # number of embedding forwards corrupted (0 or 1)
    calls: int = 0           # embedding forwards seen while armed


class EcoGuard:
    def __init__(self, model, tokenizer, classifier: PromptClassifier | None, corruption: CorruptionConfig | None = None,
                 mode: str = "entity", entities: list[str] = (), fmt: PromptFormat = PromptFormat(),
                 meta: dict | None = None):
        self.model, self.tokenizer, self.classifier = model, tokenizer, classifier
        self.corruption = corruption or CorruptionConfig()
        self.mode, self.entities, self.fmt = mode, list(entities), fmt
        self.selector = TokenSelector(tokenizer, mode, self.entities)
        self.meta = dict(meta or {})
        self.last_state: ArmState | None = None

    # -- classification ---------------------------------------------------------------------------------------
    def question_of(self, prompt: str) -> str:
        """The user text inside a formatted prompt (chat or plain wrapper stripped), else the prompt itself."""
        if self.fmt.kind == "plain":
            if prompt.startswith("Question: ") and prompt.endswith("\nAnswer:"):
                return prompt[len("Question: "):-len("\nAnswer:")]
            return prompt
        try:
            pieces = chat_pieces(self.tokenizer, self.fmt.system_prompt)
        except UserError:
            return prompt
        if pieces.prefix and prompt.startswith(pieces.prefix) and prompt.endswith(pieces.middle):
            return prompt[len(pieces.prefix):len(prompt) - len(pieces.middle)]
        return prompt

    def flags(self, prompts: list[str]) -> list[bool]:
        if self.classifier is None:  # no classifier: treat every prompt as flagged (used by the sigma search)
            return [True] * len(prompts)
        return self.classifier.flags([self.question_of(p) for p in prompts])

    # -- the hook ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def arm(self, input_ids: torch.Tensor, prompt_mask: torch.Tensor, prompts: list[str] | None = None,
            flags: list[bool] | None = None):
        """Corrupt the next input-embedding forward (see module docstring). Yields the ArmState.

        prompts=None: the prompt text is decoded from the prompt tokens. flags: skip the classifier."""
        if prompts is None:
            prompts = [self.tokenizer.decode(row[m]) for row, m in zip(input_ids.cpu(), prompt_mask.cpu().bool())]
        if len(prompts) != input_ids.shape[0] or tuple(prompt_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"EcoGuard.arm: {len(prompts)} prompts / mask {tuple(prompt_mask.shape)} do not match "
                             f"input_ids {tuple(input_ids.shape)}")
        flags = list(self.flags(prompts) if flags is None else flags)
        selected = self.selector.select(input_ids.cpu(), prompt_mask.cpu())
        selected &= torch.tensor(flags, dtype=torch.bool).unsqueeze(1)
        state = ArmState(flags=flags, selected=selected)
        self.last_state = state
        if not selected.any():
            yield state
            return

        def hook(module, inputs, output):
            state.calls += 1
            if state.fired:
                return None  # decoding steps (or a second forward) stay untouched
            if tuple(output.shape[:2]) != tuple(selected.shape):
                raise RuntimeError(f"EcoGuard: first embedding forward has shape {tuple(output.shape[:2])}, "
                                   f"armed for {tuple(selected.shape)}")
            state.fired = 1
            return self.corruption.apply(output, selected.to(output.device))

        handle = self.model.get_input_embeddings().register_forward_hook(hook)
        try:
            yield state
        finally:
            handle.remove()

    # -- convenience: generation and teacher-forced scoring ----------------------------------------------------
    def encode_prompts(self, questions: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Left-padded prompt batch (input_ids, attention_mask) and the prompt texts."""
        ids = [encode_prompt(self.tokenizer, q, self.fmt) for q in questions]
        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        attention = torch.zeros((len(ids), width), dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, width - len(x):] = torch.tensor(x)
            attention[row, width - len(x):] = 1
        return input_ids, attention, list(questions)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a chat conversation rendered in the guard's prompt format, the one sigma was fitted with
        (data.format.conversation_text: a single user message gives exactly `encode_prompt`)."""
        return encode_conversation(self.tokenizer, messages, self.fmt)

    @torch.no_grad()
    def generate(self, questions: list[str], max_new_tokens: int = 64, guard: bool = True,
                 **generate_kwargs) -> list[str]:
        """Answer each question (formatted with the guard's prompt format). guard=False: the plain model."""
        input_ids, attention, prompts = self.encode_prompts(questions)
        device = next(self.model.parameters()).device
        input_ids, attention = input_ids.to(device), attention.to(device)
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
        kwargs.update(generate_kwargs)
        if not kwargs.get("do_sample"):
            kwargs.setdefault("temperature", None)
            kwargs.setdefault("top_p", None)
            kwargs.setdefault("top_k", None)
        ctx = self.arm(input_ids, attention.bool(), prompts) if guard else contextlib.nullcontext()
        with ctx:
            out = self.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        return self.tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)

    def sequence_nll(self, batch: dict, prompts: list[str], flags: list[bool] | None = None):
        """Teacher-forced per-row answer NLL (sum, n_tokens) with the prompt tokens corrupted for flagged rows.

        `batch` comes from data.batching.collate (labels -100 on prompt and padding); only tokens that are
        attended and unlabelled — the prompt — can be corrupted, never the answer."""
        from ..train.nll import sequence_nll

        prompt_mask = batch["attention_mask"].bool() & (batch["labels"] == IGNORE)
        with self.arm(batch["input_ids"], prompt_mask, prompts, flags):
            return sequence_nll(self.model, batch)

    # -- artifact ---------------------------------------------------------------------------------------------
    def config(self) -> dict:
        return {"version": ARTIFACT_VERSION, "mode": self.mode, "entities": self.entities,
                "corruption": self.corruption.to_dict(), "prompt_format": asdict(self.fmt),
                "tau": self.classifier.tau if self.classifier else None, "metadata": self.meta}

    def save(self, out_dir, metrics: dict | None = None, search: dict | None = None) -> Path:
        """Write the artifact folder: checked first (see files.check_out_dir: new, empty or an earlier artifact),
        written to a temporary folder beside it, then moved into place whole."""
        if self.classifier is None:
            raise UserError("ECO artifact: no classifier to save")
        out = check_out_dir(out_dir, ARTIFACT_KIND)
        config, head = self.config(), self.classifier.to_dict()
        # Refuse to write what `load` would refuse (a NaN weight, a dims the model does not have, ...).
        check_config(config, f"ECO artifact {CONFIG_FILE}")
        PromptClassifier.from_dict(head, f"ECO artifact {CLASSIFIER_FILE}")
        self.corruption.check_width(embedding_width(self.model), "ECO artifact: corruption dims")
        tmp = temp_dir_beside(out)
        try:
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1, allow_nan=False))
            (tmp / CLASSIFIER_FILE).write_text(json.dumps(head, allow_nan=False))
            write_json_atomic(tmp / METRICS_FILE, metrics or {})
            write_json_atomic(tmp / SEARCH_FILE, search or {})
            publish_dir(tmp, out, ARTIFACT_KIND)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return Path(out_dir)

    @classmethod
    def load(cls, artifact_dir, model, tokenizer, device: str = "cpu") -> "EcoGuard":
        cfg, clf = read_artifact(artifact_dir, device)
        cfg.corruption.check_width(embedding_width(model), f"--eco {artifact_dir}/{CONFIG_FILE}: field "
                                   "'corruption.dims'")
        prompt_text(tokenizer, "probe", cfg.fmt)  # the model's tokenizer must render the artifact's format
        return cls(model, tokenizer, clf, cfg.corruption, cfg.mode, cfg.entities, cfg.fmt, cfg.metadata)


def embedding_width(model) -> int:
    return int(model.get_input_embeddings().weight.shape[-1])


@dataclass
class ArtifactConfig:
    """eco.json, checked."""
    mode: str
    entities: list[str]
    corruption: CorruptionConfig
    fmt: PromptFormat
    tau: float | None
    metadata: dict


def check_config(cfg, source: str) -> ArtifactConfig:
    """Validate every field of eco.json (one-line UserError naming `source` and the field)."""
    if not isinstance(cfg, dict):
        raise UserError(f"{source}: must be a JSON object")
    if cfg.get("version") != ARTIFACT_VERSION:
        raise UserError(f"{source}: field 'version' is {cfg.get('version')!r:.40}, expected {ARTIFACT_VERSION}")
    unknown = sorted(set(cfg) - {"version", "mode", "entities", "corruption", "prompt_format", "tau", "metadata"})
    if unknown:
        raise UserError(f"{source}: unknown field {unknown[0]!r}")
    mode = cfg.get("mode")
    if mode not in MODES:
        raise UserError(f"{source}: field 'mode' must be one of {', '.join(MODES)}, got {mode!r:.40}")
    entities = cfg.get("entities", [])
    if not isinstance(entities, list) or not all(isinstance(e, str) and e.strip() for e in entities):
        raise UserError(f"{source}: field 'entities' must be a list of non-empty strings")
    if "corruption" not in cfg:
        raise UserError(f"{source}: field 'corruption' is missing")
    corruption = CorruptionConfig.from_dict(cfg["corruption"], source)
    pf = cfg.get("prompt_format", {})
    if not isinstance(pf, dict) or set(pf) - {"kind", "system_prompt"}:
        raise UserError(f"{source}: field 'prompt_format' must be an object with kind and system_prompt")
    kind, system_prompt = pf.get("kind", "chat"), pf.get("system_prompt")
    if kind not in ("chat", "plain"):
        raise UserError(f"{source}: field 'prompt_format.kind' must be chat or plain, got {kind!r:.40}")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise UserError(f"{source}: field 'prompt_format.system_prompt' must be a string or null")
    tau = cfg.get("tau")
    if tau is not None and (isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau)):
        raise UserError(f"{source}: field 'tau' must be a finite number, got {tau!r:.40}")
    metadata = cfg.get("metadata", {})
    if not isinstance(metadata, dict):
        raise UserError(f"{source}: field 'metadata' must be an object")
    return ArtifactConfig(mode, list(entities), corruption, PromptFormat(kind, system_prompt), tau, metadata)


def read_artifact(artifact_dir, device: str = "cpu") -> tuple[ArtifactConfig, PromptClassifier]:
    """Read and validate an artifact folder without a model: every field and number is checked, so a damaged
    artifact is refused before anything loads."""
    path = Path(artifact_dir)
    if not path.is_dir():
        raise UserError(f"--eco {path}: no such directory")
    for name in (CONFIG_FILE, CLASSIFIER_FILE):
        if not (path / name).is_file():
            raise UserError(f"--eco {path}: missing {name} (not an ECO artifact; make one with `unlearnkit eco fit`)")
    docs = {}
    for name in (CONFIG_FILE, CLASSIFIER_FILE):
        try:
            docs[name] = json.loads((path / name).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError covers JSONDecodeError
            where = f" at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
            raise UserError(f"--eco {path}/{name}: invalid JSON ({getattr(e, 'msg', e)}{where})") from e
    cfg = check_config(docs[CONFIG_FILE], f"--eco {path}/{CONFIG_FILE}")
    clf = PromptClassifier.from_dict(docs[CLASSIFIER_FILE], f"--eco {path}/{CLASSIFIER_FILE}", device)
    if cfg.tau is not None and cfg.tau != clf.tau:
        raise UserError(f"--eco {path}: field 'tau' is {cfg.tau} in {CONFIG_FILE} but {clf.tau} in "
                        f"{CLASSIFIER_FILE}; the artifact is damaged")
    return cfg, clf


def read_metrics(artifact_dir) -> dict:
    path = Path(artifact_dir) / METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
