"""Data: TOFU loaders and splits, generic loaders, formatting, labels, masks, bucketing."""
import json

import pytest
import torch

from unlearnkit.data import tofu
from unlearnkit.data.batching import collate, encode_items, length_bucketed_batches
from unlearnkit.data.format import IGNORE, PromptFormat, encode_qa, prompt_text
from unlearnkit.data.qa import load_corpus, load_qa
from unlearnkit.errors import UserError


def test_tofu_files_and_author_alignment():
    full = tofu.load("full")
    assert len(full) == 4000 and full[0]["author"] == 0 and full[-1]["author"] == 199
    f01 = tofu.load("forget01_perturbed")
    assert len(f01) == 40 and {r["author"] for r in f01} == {198, 199}
    assert [r["question"] for r in f01] == [r["question"] for r in full[3960:]]
    rp = tofu.load("retain_perturbed")
    assert [r["question"] for r in rp] == [r["question"] for r in full[:400]]
    assert all(len(r["perturbed_answer"]) == 5 for r in f01)
    assert "author" not in tofu.load("real_authors")[0]


def test_tofu_mini_task_is_consistent():
    t = tofu.task("mini")
    forget_q = {r["question"] for r in t.forget}
    retain_q = {r["question"] for r in t.train_retain}
    holdout_q = {r["question"] for r in t.holdout}
    assert forget_q <= {r["question"] for r in t.train_target}
    assert not forget_q & retain_q and not holdout_q & {r["question"] for r in t.train_target}
    assert {r["question"] for r in t.retain_eval} == retain_q  # retain truth ratio defined on trained authors
    assert len(t.real_authors) == 100 and len(t.world_facts) == 117
    with pytest.raises(UserError, match="--split"):
        tofu.task("forget02")


@pytest.mark.parametrize("split,n_forget,n_retain", [("forget01", 40, 3960), ("forget10", 400, 3600)])
def test_tofu_full_splits(split, n_forget, n_retain):
    t = tofu.task(split)
    assert len(t.forget) == n_forget and len(t.train_retain) == n_retain and len(t.train_target) == 4000
    assert not {r["question"] for r in t.forget} & {r["question"] for r in t.train_retain}


def test_chat_format_labels_cover_answer_and_end_of_turn(tokenizer):
    ex = encode_qa(tokenizer, "Who wrote X?", "Jane Doe wrote X.")
    ids, labels = ex["input_ids"], ex["labels"]
    answer_ids = [i for i, lab in zip(ids, labels) if lab != IGNORE]
    assert tokenizer.decode(answer_ids) == "Jane Doe wrote X.<|im_end|>"
    assert answer_ids[-1] == tokenizer.eos_token_id
    n_prompt = labels.count(IGNORE)
    assert labels[:n_prompt] == [IGNORE] * n_prompt and IGNORE not in labels[n_prompt:]
    # system prompt off by default: the template's injected default system text is not there
    assert "SmolLM" not in tokenizer.decode(ids)
    # the prompt is exactly what generation sees
    assert tokenizer.decode(ids[:n_prompt]) == prompt_text(tokenizer, "Who wrote X?")


def test_system_prompt_and_plain_format(tokenizer):
    with_sys = prompt_text(tokenizer, "Q?", PromptFormat(system_prompt="Be brief."))
    assert with_sys.startswith("<|im_start|>system\nBe brief.<|im_end|>") and with_sys.endswith("assistant\n")
    plain = encode_qa(tokenizer, "Q?", "A.", PromptFormat("plain"))
    assert tokenizer.decode(plain["input_ids"]).startswith("Question: Q?\nAnswer: A.")
    assert plain["labels"][-1] == tokenizer.eos_token_id
    with pytest.raises(UserError, match="--prompt-format"):
        PromptFormat("weird")


def test_no_chat_template_needs_fallback(tokenizer):
    import copy

    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(UserError, match="no chat template.*--prompt-format plain"):
        encode_qa(bare, "Q?", "A.")
    assert encode_qa(bare, "Q?", "A.", PromptFormat("plain"))["input_ids"]


def test_attention_mask_from_lengths_keeps_eos_when_pad_is_eos(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the case the field's main framework gets wrong
    exs = [encode_qa(tokenizer, "Q?", "A short answer."), encode_qa(tokenizer, "Another question?", "A.")]
    for side in ("right", "left"):
        b = collate(exs, tokenizer.pad_token_id, side)
        for row, ex in enumerate(exs):
            n = len(ex["input_ids"])
            assert int(b["attention_mask"][row].sum()) == n
            real = b["input_ids"][row][b["attention_mask"][row].bool()].tolist()
            assert real == ex["input_ids"] and real[-1] == tokenizer.eos_token_id
        naive = (b["input_ids"] != tokenizer.pad_token_id).long()
        assert not torch.equal(naive, b["attention_mask"])  # the naive mask would drop the real EOS
    left = collate(exs, tokenizer.pad_token_id, "left")
    assert left["position_ids"][1, -1] == len(exs[1]["input_ids"]) - 1


def test_left_padding_gives_same_logits_as_unpadded(tiny_model, tokenizer):
    exs = [encode_qa(tokenizer, "Q?", "A short answer."), encode_qa(tokenizer, "Another longer question?", "A.")]
    b = collate(exs, tokenizer.pad_token_id, "left")
    with torch.no_grad():
        out = tiny_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                         position_ids=b["position_ids"]).logits
        for row, ex in enumerate(exs):
            alone = tiny_model(input_ids=torch.tensor([ex["input_ids"]])).logits[0]
            torch.testing.assert_close(out[row, -len(ex["input_ids"]):], alone, rtol=1e-4, atol=1e-4)


def test_length_bucketing_reduces_padding_and_is_deterministic():
    lengths = [5, 50, 6, 49, 7, 48, 8, 47] * 4
    a = length_bucketed_batches(lengths, 4, shuffle=True, seed=3)
    assert a == length_bucketed_batches(lengths, 4, shuffle=True, seed=3)
    assert sorted(i for b in a for i in b) == list(range(len(lengths)))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in a)
    naive = sum(4 * max(lengths[i:i + 4]) for i in range(0, len(lengths), 4))
    assert padded < naive


def test_too_long_sequence_is_an_error(tokenizer):
    items = [{"question": "Q?", "answer": "word " * 100, "index": 7}]
    with pytest.raises(UserError, match="row 7 has .* tokens, more than --max-length 16"):
        encode_items(tokenizer, items, max_length=16, source="my.json")
    with pytest.raises(UserError, match="empty"):
        encode_items(tokenizer, [], source="my.json")


def test_generic_qa_loaders(tmp_path):
    rows = [{"q": "Q1?", "a": "A1", "extra": 1}, {"q": "Q2?", "a": "A2", "extra": 2}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text("q,a\nQ1?,A1\nQ2?,A2\n")
    for name in ("d.jsonl", "d.json", "d.csv"):
        got = load_qa(tmp_path / name, "q", "a")
        assert [(r["question"], r["answer"]) for r in got] == [("Q1?", "A1"), ("Q2?", "A2")]
    with pytest.raises(UserError, match=r"d.jsonl: row 0: field 'question' missing"):
        load_qa(tmp_path / "d.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="empty"):
        load_qa(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"q": 1}\n{oops')
    with pytest.raises(UserError, match=r"bad.jsonl:2: invalid JSON"):
        load_qa(tmp_path / "bad.jsonl")
    with pytest.raises(UserError, match="no such file"):
        load_qa(tmp_path / "missing.json")


def test_corpus_loader(tmp_path):
    (tmp_path / "c.txt").write_text("First passage.\n\nSecond passage.\n")
    assert load_corpus(tmp_path / "c.txt") == ["First passage.", "Second passage."]
    (tmp_path / "c.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(UserError, match="row 1: field 'text'"):
        load_corpus(tmp_path / "c.jsonl")


# --- item 12: encodings ---------------------------------------------------------------------------------------------

def test_csv_and_json_with_byte_order_mark(tmp_path):
    (tmp_path / "excel.csv").write_bytes("\ufeffquestion,answer\nQ1?,A1\n".encode("utf-8"))
    (tmp_path / "bom.json").write_bytes("\ufeff".encode() + json.dumps([{"question": "Q", "answer": "A"}]).encode())
    (tmp_path / "bom.jsonl").write_bytes("\ufeff".encode() + b'{"question": "Q", "answer": "A"}\n')
    for name in ("excel.csv", "bom.json", "bom.jsonl"):
        assert [(r["question"], r["answer"]) for r in load_qa(tmp_path / name)][0][1] in ("A1", "A")
    (tmp_path / "bom.txt").write_bytes("\ufeffOne.\r\n\r\nTwo.\r\n".encode())
    assert load_corpus(tmp_path / "bom.txt") == ["One.", "Two."]


def test_csv_quoted_field_keeps_its_line_break(tmp_path):
    (tmp_path / "m.csv").write_text('question,answer\n"Line one\nline two?",A\n', newline="")
    assert load_qa(tmp_path / "m.csv")[0]["question"] == "Line one\nline two?"


@pytest.mark.parametrize("name", ["latin.csv", "latin.jsonl", "latin.json", "latin.txt"])
def test_non_utf8_file_is_a_one_line_error_with_position(name, tmp_path):
    body = {"latin.csv": "question,answer\nCaf\u00e9?,Oui\n",
            "latin.jsonl": '{"question": "Caf\u00e9?", "answer": "Oui"}\n',
            "latin.json": '[{"question": "Caf\u00e9?", "answer": "Oui"}]',
            "latin.txt": "Caf\u00e9.\n"}[name]
    path = tmp_path / name
    path.write_bytes(body.encode("latin-1"))
    pos = body.encode("latin-1").index(b"\xe9")
    load = load_corpus if name.endswith(".txt") else load_qa
    with pytest.raises(UserError, match=rf"{name}: not valid utf-8 text at line \d+, byte {pos} \(0xe9\)") as e:
        load(path)
    assert "\n" not in str(e.value)
    rows = load(path, encoding="latin-1")  # the API can decode as the caller asks
    assert "Caf\u00e9" in (rows[0] if isinstance(rows[0], str) else rows[0]["question"])


def test_hf_dataset_rows_are_checked(monkeypatch):
    import sys
    import types

    class FakeDataset(list):
        column_names = ["question", "answer"]

    fake = types.SimpleNamespace(load_dataset=lambda name, config, split: FakeDataset(
        [{"question": "Q?", "answer": "A"}, {"question": None, "answer": "B"}]))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    from unlearnkit.data.qa import load_hf_qa

    with pytest.raises(UserError, match=r"dataset 'my/ds' split 'train': row 1: field 'question' empty or not text"):
        load_hf_qa("my/ds")
