"""files.py: what unlearnkit may write, replace or delete (output folders, output files, atomic writes)."""
import json
import os

import pytest

from unlearnkit.errors import UserError
from unlearnkit.files import (MARKER, check_out_dir, check_out_file, claim_out_dir, publish_dir, temp_dir_beside,
                              write_json_atomic, write_text_atomic)


def _publish(out, kind="demo", files=("summary.json",)):
    tmp = temp_dir_beside(out)
    for name in files:
        (tmp / name).write_text("{}")
    return publish_dir(tmp, out, kind)


def test_accepts_new_empty_and_own_previous_folder(tmp_path):
    assert check_out_dir(tmp_path / "new" / "run", "demo") == tmp_path / "new" / "run"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    (tmp_path / "empty").mkdir()
    check_out_dir(tmp_path / "empty", "demo")
    _publish(tmp_path / "run")
    check_out_dir(tmp_path / "run", "demo")
    claim_out_dir(tmp_path / "claimed", "unlearn", files=["run.json"])
    (tmp_path / "claimed" / "checkpoint").mkdir()  # a work name of the kind
    check_out_dir(tmp_path / "claimed", "unlearn")


def test_refuses_user_folder_and_other_kinds(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError, match=r"--out .*mine: folder is not empty and was not written by unlearnkit"):
        check_out_dir(tmp_path / "mine", "demo")
    _publish(tmp_path / "run", kind="prepare")
    with pytest.raises(UserError, match="holds the output of `prepare`"):
        check_out_dir(tmp_path / "run", "demo")


def test_refuses_foreign_file_inside_previous_run_folder(tmp_path):
    out = _publish(tmp_path / "run")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds 'notes.txt', which unlearnkit did not write"):
        check_out_dir(out, "demo")


def test_refuses_current_folder_and_its_parents(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(UserError, match="is the current folder"):
        check_out_dir(".", "demo")
    with pytest.raises(UserError, match="contains the current folder"):
        check_out_dir(tmp_path, "demo")


def test_refuses_output_equal_to_inside_or_around_an_input(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(UserError, match="is the input"):
        check_out_dir(model, "unlearn", inputs=[model])
    with pytest.raises(UserError, match="is inside the input"):
        check_out_dir(model / "out", "unlearn", inputs=[model])
    with pytest.raises(UserError, match="contains the input"):
        check_out_dir(tmp_path, "unlearn", inputs=[model])


def test_refuses_a_file_path_and_an_unwritable_place(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):
        check_out_dir(tmp_path / "f", "demo")
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_out_dir(tmp_path / "f" / "run", "demo")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(UserError, match="cannot write"):
                check_out_dir(ro / "run", "demo")
        finally:
            ro.chmod(0o700)


def test_publish_replaces_own_folder_whole(tmp_path):
    out = _publish(tmp_path / "run", files=("a.json",))
    _publish(out, files=("b.json",))
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "b.json"])
    assert json.loads((out / MARKER).read_text())["files"] == ["b.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temporary or old folder left


def test_publish_never_deletes_a_folder_that_is_not_ours(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "data.csv").write_text("precious")
    tmp = temp_dir_beside(out)
    (tmp / "summary.json").write_text("{}")
    with pytest.raises(UserError):
        publish_dir(tmp, out, "demo")
    assert (out / "data.csv").read_text() == "precious"
    # Ours when checked, changed before publishing (a user file dropped in): still refused.
    out2 = _publish(tmp_path / "run2")
    (out2 / "data.csv").write_text("precious")
    tmp = temp_dir_beside(out2)
    with pytest.raises(UserError):
        publish_dir(tmp, out2, "demo")
    assert (out2 / "data.csv").read_text() == "precious"


def test_publish_survives_a_leftover_from_a_killed_run(tmp_path):
    out = _publish(tmp_path / "run")
    for stale in (f".unlearnkit-tmp-old-run-{os.getpid()}", ".unlearnkit-tmp-old-run-x"):
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "f").write_text("x")
    _publish(out, files=("c.json",))
    assert (out / "c.json").is_file()


def test_out_file_rules(tmp_path):
    with pytest.raises(UserError, match="--json .*: is a folder"):
        check_out_file(tmp_path, key="bench")
    with pytest.raises(UserError, match="is a folder"):
        check_out_file(str(tmp_path / "newdir") + "/", key="bench")
    (tmp_path / "user.json").write_text('{"mine": 1}')
    with pytest.raises(UserError, match="not written by unlearnkit"):
        check_out_file(tmp_path / "user.json", key="bench")
    (tmp_path / "notes.txt").write_text("not json")
    with pytest.raises(UserError, match="not written by unlearnkit"):
        check_out_file(tmp_path / "notes.txt", key="bench")
    write_json_atomic(tmp_path / "old.json", {"bench": "rmu", "speedup": 2.0})
    check_out_file(tmp_path / "old.json", key="bench")
    check_out_file(tmp_path / "sub" / "new.json", key="bench")
    assert not (tmp_path / "sub").exists()


def test_atomic_writes(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"x": float("nan"), "y": [1.5]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": None, "y": [1.5]}
    write_text_atomic(tmp_path / "a.json", "z")
    assert (tmp_path / "a.json").read_text() == "z"
    with pytest.raises(TypeError):
        write_text_atomic(tmp_path / "a.json", 5)
    assert (tmp_path / "a.json").read_text() == "z"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
