"""EcoGuard hook semantics on a tiny model: prefill only, flagged rows only, selected prompt tokens only."""
import json

import numpy as np
import pytest
import torch

from unlearnkit.data.batching import collate
from unlearnkit.data.format import encode_qa, prompt_text
from unlearnkit.eco.classifier import PromptClassifier
from unlearnkit.eco.corrupt import CorruptionConfig
from unlearnkit.eco.entities import TokenSelector, extract_entities
from unlearnkit.eco.guard import EcoGuard
from unlearnkit.errors import UserError


class KeywordClassifier:
    """Stands in for the MiniLM classifier: flags prompts containing a keyword."""
    tau = 0.5

    def __init__(self, word="Zorblax"):
        self.word = word
        self.seen = []

    def flags(self, prompts):
        self.seen += prompts
        return [self.word.lower() in p.lower() for p in prompts]


QUESTIONS = ["Who is Zorblax Quentin the painter?", "What is the capital of France?",
             "Tell me about Zorblax Quentin's books."]


def _recorder(model):
    """Record (input_ids, embedding output) of every embedding forward; registered after the guard's hook."""
    calls = []
    handle = model.get_input_embeddings().register_forward_hook(
        lambda m, i, o: calls.append((i[0].detach().clone(), o.detach().clone())))
    return calls, handle


def test_generate_corrupts_prefill_of_flagged_rows_only(tiny_model, tokenizer):
    guard = EcoGuard(tiny_model, tokenizer, KeywordClassifier(), CorruptionConfig(sigma=5.0), mode="all")
    input_ids, attention, prompts = guard.encode_prompts(QUESTIONS)
    weight = tiny_model.get_input_embeddings().weight
    with guard.arm(input_ids, attention.bool(), prompts) as state:
        calls, handle = _recorder(tiny_model)
        tiny_model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=4, min_new_tokens=4,
                            do_sample=False, pad_token_id=tokenizer.pad_token_id)
        handle.remove()
    assert state.flags == [True, False, True] and state.fired == 1
    assert len(calls) == 4  # prefill + 3 decoding steps
    ids0, out0 = calls[0]
    changed = (out0 != weight[ids0]).any(-1)
    expected = attention.bool().clone()
    expected[1] = False                      # unflagged row untouched
    expected[:, -1] = False                  # last prompt token kept ("all" = all but the last)
    assert torch.equal(changed, expected)
    for ids, out in calls[1:]:               # decoding steps: exactly the plain embeddings
        assert ids.shape[1] == 1 and torch.equal(out, weight[ids])


def test_unflagged_generation_equals_plain_and_flagged_differs(tiny_model, tokenizer):
    guard = EcoGuard(tiny_model, tokenizer, KeywordClassifier(), CorruptionConfig(sigma=50.0), mode="all")
    plain = guard.generate(QUESTIONS, max_new_tokens=6, guard=False)
    guarded = guard.generate(QUESTIONS, max_new_tokens=6)
    assert guarded[1] == plain[1]
    assert guarded[0] != plain[0] or guarded[2] != plain[2]
    # The hook is gone after arm(): the model is unchanged.
    assert guard.generate(QUESTIONS, max_new_tokens=6, guard=False) == plain


def test_teacher_forced_scoring_corrupts_prompt_tokens_only(tiny_model, tokenizer):
    from unlearnkit.train.nll import sequence_nll

    guard = EcoGuard(tiny_model, tokenizer, KeywordClassifier(), CorruptionConfig(sigma=5.0), mode="all")
    batch = collate([encode_qa(tokenizer, q, "Some answer here.") for q in QUESTIONS], tokenizer.pad_token_id)
    prompts = [prompt_text(tokenizer, q) for q in QUESTIONS]  # formatted prompts: wrapper stripped for the classifier
    weight = tiny_model.get_input_embeddings().weight
    calls, handle = _recorder(tiny_model)  # registered before the guard's hook → sees clean embeddings
    plain_nll, _ = sequence_nll(tiny_model, batch)
    handle.remove()
    with guard.arm(batch["input_ids"], batch["attention_mask"].bool() & (batch["labels"] == -100), prompts):
        calls, handle = _recorder(tiny_model)
        guarded_nll, _ = sequence_nll(tiny_model, batch)
        handle.remove()
    assert guard.classifier.seen[-3:] == QUESTIONS
    ids, out = calls[0]
    changed = (out != weight[ids]).any(-1)
    answer = batch["labels"] != -100
    assert not changed[answer].any() and not changed[1].any()
    assert changed[0].any() and changed[2].any()
    assert not changed[batch["attention_mask"] == 0].any()  # padding untouched
    assert guarded_nll[1] == plain_nll[1]
    assert guarded_nll[0] != plain_nll[0]
    again, _ = guard.sequence_nll(batch, prompts)
    assert torch.allclose(again, guarded_nll)  # seeded: same noise, same score


def test_entity_mode_selects_name_tokens_with_fallback(tokenizer):
    sel = TokenSelector(tokenizer, "entity", ["Zorblax Quentin"])
    prompts = ["Who is Zorblax Quentin?", "Tell me about QUENTIN", "What is the capital of France?"]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(map(len, ids))
    input_ids = torch.full((3, width), tokenizer.pad_token_id)
    mask = torch.zeros((3, width), dtype=torch.bool)
    for r, x in enumerate(ids):
        input_ids[r, :len(x)] = torch.tensor(x)
        mask[r, :len(x)] = True
    out = sel.select(input_ids, mask)
    picked = tokenizer.decode(input_ids[0][out[0]])
    assert picked.replace(" ", "") == "ZorblaxQuentin"
    assert "uentin" in tokenizer.decode(input_ids[1][out[1]]).lower()
    assert torch.equal(out[2], mask[2] & (torch.arange(width) < len(ids[2]) - 1))  # no name: all but last
    with pytest.raises(UserError, match="--mode"):
        TokenSelector(tokenizer, "some")


def test_extract_entities_from_forget_texts():
    forget = ["What did Zorblax Quentin write?", "Zorblax Quentin was born in Paris.",
              "How did Zorblax Quentin's father influence him?", "Where is New York?", "New York is big."]
    names = extract_entities(forget, negative_texts=["I live in New York."])
    assert names == ["Zorblax Quentin"]


def _random_classifier(seed=0, tau=0.7):
    coef = np.random.default_rng(seed).normal(size=384).astype(np.float32)
    return PromptClassifier(coef=coef, intercept=-0.25, tau=tau, info={"n_calibration": 10})


def test_artifact_round_trip(tmp_path, tiny_model, tokenizer):
    guard = EcoGuard(tiny_model, tokenizer, _random_classifier(), CorruptionConfig("flip_sign_top_k", 0.0, 4, 3),
                     mode="entity", entities=["Zorblax Quentin"], meta={"split": "mini"})
    out = guard.save(tmp_path / "art", metrics={"fpr": {"retain": 0.0}}, search={"log": [1, 2]})
    loaded = EcoGuard.load(out, tiny_model, tokenizer)
    assert loaded.config() == guard.config()
    assert np.array_equal(loaded.classifier.coef, guard.classifier.coef)
    assert loaded.classifier.tau == 0.7 and loaded.classifier.intercept == -0.25
    assert json.loads((out / "metrics.json").read_text()) == {"fpr": {"retain": 0.0}}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left
    guard.save(out)  # replacing an artifact is fine


def test_bad_artifacts_are_one_line_user_errors(tmp_path, tiny_model, tokenizer):
    with pytest.raises(UserError, match="no such directory"):
        EcoGuard.load(tmp_path / "missing", tiny_model, tokenizer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="missing eco.json"):
        EcoGuard.load(tmp_path / "empty", tiny_model, tokenizer)
    art = EcoGuard(tiny_model, tokenizer, _random_classifier()).save(tmp_path / "art")
    (art / "classifier.json").write_text("{not json")
    with pytest.raises(UserError, match="invalid JSON"):
        EcoGuard.load(art, tiny_model, tokenizer)
    (art / "classifier.json").write_text(json.dumps({"coef": [1, 2], "intercept": 0, "tau": 0.5}))
    with pytest.raises(UserError, match="coef"):
        EcoGuard.load(art, tiny_model, tokenizer)
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not written by unlearnkit"):
        EcoGuard(tiny_model, tokenizer, _random_classifier()).save(other)
    assert sorted(p.name for p in other.iterdir()) == ["keep.txt"] and not list(tmp_path.glob(".unlearnkit-tmp-*"))


def _saved_artifact(tmp_path, tiny_model, tokenizer):
    guard = EcoGuard(tiny_model, tokenizer, _random_classifier(), CorruptionConfig("rand_noise_first_n", 0.5, 8, 3),
                     mode="entity", entities=["Zorblax Quentin"])
    return guard.save(tmp_path / "art")


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("file, path, value, needle", [
    ("classifier.json", ("coef", 5), NAN, "'coef'[5]"),
    ("classifier.json", ("coef", 0), INF, "'coef'[0]"),
    ("classifier.json", ("coef", 0), 1e39, "'coef'[0]"),  # overflows the float32 head
    ("classifier.json", ("coef", 0), "0.5", "'coef'[0]"),
    ("classifier.json", ("coef", 0), True, "'coef'[0]"),
    ("classifier.json", ("intercept",), NAN, "'intercept'"),
    ("classifier.json", ("intercept",), -INF, "'intercept'"),
    ("classifier.json", ("tau",), NAN, "'tau'"),
    ("classifier.json", ("tau",), INF, "'tau'"),
    ("classifier.json", ("tau",), 1.5, "'tau'"),
    ("classifier.json", ("tau",), None, "'tau'"),
    ("classifier.json", ("target_fpr",), NAN, "'target_fpr'"),
    ("classifier.json", ("target_fpr",), 0, "'target_fpr'"),
    ("classifier.json", ("target_fpr",), 1.0, "'target_fpr'"),
    ("classifier.json", ("info",), [1], "'info'"),
    ("classifier.json", ("extra",), 1, "unknown field"),
    ("eco.json", ("tau",), NAN, "'tau'"),
    ("eco.json", ("tau",), 0.1, "'tau'"),  # disagrees with classifier.json
    ("eco.json", ("corruption", "sigma"), NAN, "corruption.sigma"),
    ("eco.json", ("corruption", "sigma"), INF, "corruption.sigma"),
    ("eco.json", ("corruption", "sigma"), -1, "corruption.sigma"),
    ("eco.json", ("corruption", "sigma"), "1", "corruption.sigma"),
    ("eco.json", ("corruption", "dims"), 0, "corruption.dims"),
    ("eco.json", ("corruption", "dims"), 2.5, "corruption.dims"),
    ("eco.json", ("corruption", "dims"), 10_000, "corruption.dims"),  # wider than the model's embeddings
    ("eco.json", ("corruption", "seed"), 1.5, "corruption.seed"),
    ("eco.json", ("corruption", "seed"), 2 ** 70, "corruption.seed"),
    ("eco.json", ("corruption", "method"), "nope", "corruption.method"),
    ("eco.json", ("corruption",), "rand_noise_first_n", "'corruption'"),
    ("eco.json", ("mode",), "some", "'mode'"),
    ("eco.json", ("entities",), "Zorblax", "'entities'"),
    ("eco.json", ("entities",), [3], "'entities'"),
    ("eco.json", ("prompt_format", "kind"), "html", "prompt_format.kind"),
    ("eco.json", ("prompt_format", "system_prompt"), 3, "prompt_format.system_prompt"),
    ("eco.json", ("metadata",), [], "'metadata'"),
])
def test_damaged_artifact_refuses_to_load(tmp_path, tiny_model, tokenizer, file, path, value, needle):
    from unlearnkit.eco.guard import read_artifact

    art = _saved_artifact(tmp_path, tiny_model, tokenizer)
    doc = json.loads((art / file).read_text())
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    (art / file).write_text(json.dumps(doc))  # json writes NaN / Infinity, as a damaged file may hold
    with pytest.raises(UserError) as e:
        EcoGuard.load(art, tiny_model, tokenizer)
    assert needle in str(e.value) and file in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)
    if path != ("corruption", "dims") or value != 10_000:  # the width needs the model; the rest is found without
        with pytest.raises(UserError, match="--eco"):
            read_artifact(art)


def test_artifact_save_refuses_what_load_would_refuse(tmp_path, tiny_model, tokenizer):
    clf = _random_classifier()
    clf.coef[3] = np.nan
    with pytest.raises(UserError, match="'coef'"):
        EcoGuard(tiny_model, tokenizer, clf).save(tmp_path / "a")
    with pytest.raises(UserError, match="dims"):
        EcoGuard(tiny_model, tokenizer, _random_classifier(), CorruptionConfig(dims=33)).save(tmp_path / "b")
    assert not list(tmp_path.iterdir())


def test_artifact_folder_replaces_only_artifacts(tmp_path, tiny_model, tokenizer):
    art = _saved_artifact(tmp_path, tiny_model, tokenizer)
    assert (art / ".unlearnkit.json").is_file()
    # An artifact written before the marker existed is still ours to replace.
    (art / ".unlearnkit.json").unlink()
    guard = EcoGuard(tiny_model, tokenizer, _random_classifier(seed=1))
    guard.save(art)
    assert EcoGuard.load(art, tiny_model, tokenizer).config() == guard.config()
    (art / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="notes.txt"):
        guard.save(art)
    assert (art / "notes.txt").read_text() == "mine"
