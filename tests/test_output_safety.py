"""Output directories: a command writes a fresh directory, replaces only an earlier output of its own
when asked to (--overwrite), never touches what it reads, and leaves nothing behind when interrupted."""

import json
import os
import shutil
import signal
import sys
import time

import pytest
from helpers import TRAJECTORY, interruptible, refusal

from comet_ds.cli import main as comet_ds
from data_prep.cli import main as prep
from data_prep.fs import OUTPUT_MARKER


def passkey(tokenizer, output, *extra):
    prep(["passkey", "--tokenizer", str(tokenizer), "--lengths", "200", "--output", str(output), "--quiet", *extra])


def listing(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# an output over what the command reads, or over a directory it did not write


def test_agent_logs_output_over_its_own_input_is_refused(base_dirs, tmp_path, capsys):
    logs = tmp_path / "logs"
    logs.mkdir()
    source = logs / "x.jsonl"
    source.write_text(json.dumps(TRAJECTORY) + "\n")
    err = refusal(capsys, lambda: prep(["agent-logs", str(source), "--tokenizer", base_dirs["llama"],
                                        "--output", str(logs), "--quiet"]))
    assert str(logs) in err and str(source) in err
    assert source.read_text() == json.dumps(TRAJECTORY) + "\n"


def test_export_refuses_a_directory_it_did_not_write(adapter, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    err = refusal(capsys, lambda: comet_ds(["export", "--adapter", str(adapter), "--merge", "--out", str(out)]))
    assert str(out) in err and "comet-ds export" in err
    assert listing(out) == {"notes.txt": b"keep me"}


def test_passkey_output_onto_its_tokenizer_is_refused(base_dirs, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(base_dirs["llama"], base)
    before = listing(base)
    err = refusal(capsys, lambda: passkey(base, base))
    assert err.count(str(base)) >= 2  # both roles named
    assert listing(base) == before


# --overwrite


def test_overwrite_replaces_an_earlier_output_of_the_same_command_atomically(base_dirs, tmp_path, capsys,
                                                                             monkeypatch):
    out = tmp_path / "passkey"
    passkey(base_dirs["llama"], out)
    assert json.loads((out / OUTPUT_MARKER).read_text())["command"] == "comet-prep passkey"
    first = listing(out)
    err = refusal(capsys, lambda: passkey(base_dirs["llama"], out, "--seed", "1"))
    assert "--overwrite" in err
    assert listing(out) == first

    from data_prep.output import DatasetWriter

    def disk_full(*_):
        raise OSError("disk full")

    with monkeypatch.context() as patch:  # a failure halfway leaves the earlier output whole
        patch.setattr(DatasetWriter, "finish", disk_full)
        assert "disk full" in refusal(capsys, lambda: passkey(base_dirs["llama"], out, "--seed", "1", "--overwrite"))
    assert listing(out) == first

    passkey(base_dirs["llama"], out, "--seed", "1", "--overwrite")
    assert listing(out)["data/data-00000-of-00001.arrow"] != first["data/data-00000-of-00001.arrow"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["passkey"]  # no scratch or retired copy left


def test_overwrite_refuses_a_directory_of_another_owner(base_dirs, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert "not empty" in refusal(capsys, lambda: passkey(base_dirs["llama"], foreign, "--overwrite"))
    assert listing(foreign) == {"notes.txt": b"keep me"}

    needle = tmp_path / "needle"
    prep(["needle", "--tokenizer", base_dirs["llama"], "--lengths", "300", "--output", str(needle), "--quiet"])
    before = listing(needle)
    assert "comet-prep needle" in refusal(capsys, lambda: passkey(base_dirs["llama"], needle, "--overwrite"))
    assert listing(needle) == before


def test_an_empty_directory_is_written_into(base_dirs, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    passkey(base_dirs["llama"], out)
    assert (out / "manifest.json").is_file()


def test_what_a_command_reads_stays_outside_its_output_even_with_overwrite(base_dirs, tmp_path, capsys):
    out = tmp_path / "agent"
    source = tmp_path / "x.jsonl"
    source.write_text(json.dumps(TRAJECTORY) + "\n")
    prep(["agent-logs", str(source), "--tokenizer", base_dirs["llama"], "--output", str(out), "--quiet"])
    inside = out / "x.jsonl"
    shutil.copy(source, inside)
    err = refusal(capsys, lambda: prep(["agent-logs", str(inside), "--tokenizer", base_dirs["llama"],
                                        "--output", str(out), "--overwrite", "--quiet"]))
    assert str(inside) in err and str(out) in err
    assert inside.is_file()

    base = tmp_path / "base"  # an output inside the tokenizer directory would mix into the model
    shutil.copytree(base_dirs["llama"], base)
    err = refusal(capsys, lambda: passkey(base, base / "passkey", "--overwrite"))
    assert str(base / "passkey") in err and not (base / "passkey").exists()


# refused before any work


@pytest.mark.parametrize("command", ["passkey", "agent-logs", "user-behavior"])
def test_a_file_as_output_is_refused_before_any_work(tmp_path, capsys, command):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    inputs = [] if command == "passkey" else [str(tmp_path / "missing.jsonl")]
    start = time.perf_counter()  # a missing tokenizer and input: only the output is looked at first
    err = refusal(capsys, lambda: prep([command, *inputs, "--tokenizer", str(tmp_path / "no-tokenizer"),
                                        "--output", str(taken)]))
    assert time.perf_counter() - start < 2.0
    assert str(taken) in err and "is a file" in err and taken.read_text() == "a file"
    assert "is a file" in refusal(capsys, lambda: prep([command, *inputs, "--tokenizer", str(tmp_path / "x"),
                                                        "--output", str(taken / "below")]))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_an_unwritable_output_is_refused_before_any_work(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        err = refusal(capsys, lambda: prep(["passkey", "--tokenizer", str(tmp_path / "no-tokenizer"),
                                            "--output", str(locked / "deeper" / "out")]))
    finally:
        locked.chmod(0o755)
    assert "cannot write" in err and str(locked) in err


def test_comet_ds_outputs_are_checked_before_loading_anything(adapter, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("keep me")
    missing = str(tmp_path / "missing-model")
    for argv in (["init-base", "--out", str(taken)],
                 ["export", "--adapter", str(adapter), "--merge", "--out", str(taken), "--overwrite"],
                 ["eval", "passkey", "--model", missing, "--out", str(taken)],
                 ["eval", "qa", "--model", missing, "--data", missing, "--out", str(taken)],
                 ["demo", "--out", str(taken)]):
        err = refusal(capsys, lambda argv=argv: comet_ds(argv))
        assert "not empty" in err and str(taken) in err, argv
    assert listing(taken) == {"notes.txt": b"keep me"}


def test_eval_writes_into_a_directory_that_holds_its_own_earlier_files(adapter, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", "passkey", "--model", str(adapter), "--lengths", "200", "--depths", "1", "--threads", "1",
            "--out", str(out)]
    comet_ds(argv)
    capsys.readouterr()
    assert "--overwrite" in refusal(capsys, lambda: comet_ds(argv))
    comet_ds([*argv, "--overwrite"])
    assert (out / "passkey.json").is_file()
    capsys.readouterr()
    err = refusal(capsys, lambda: comet_ds(["eval", "passkey", "--model", str(adapter), "--out", str(adapter)]))
    assert str(adapter) in err


# interrupted


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_prep_leaves_no_scratch_or_spill(base_dirs, tmp_path, signum):
    from comet_ds.bench.prep import write_user_behavior_csv

    source = tmp_path / "events.csv"
    write_user_behavior_csv(source, 6)
    parent, spill = tmp_path / "out", tmp_path / "spill"
    parent.mkdir()
    spill.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = interruptible([sys.executable, "-m", "data_prep", "user-behavior", str(source), "--tokenizer",
                             base_dirs["llama"], "--output", str(parent / "users"), "--spill-dir", str(spill),
                             "--bucket-mb", "1", "--quiet"], env)
    deadline = time.monotonic() + 60
    while not list(parent.glob(".users.tmp-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # into the reading and spilling
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert list(parent.iterdir()) == [] and list(spill.iterdir()) == []


def test_a_training_run_replaces_only_its_own_final_adapter(tmp_path):
    """The arguments train() gives for output_dir/adapter: its earlier adapter is replaced whole, a
    directory it did not write is refused, and a failure keeps the earlier one."""
    from data_prep.fs import OutputDirectoryError, output_directory

    adapter = tmp_path / "adapter"
    for weights in (b"first", b"second"):
        with output_directory(adapter, "comet-ds train", overwrite=True) as scratch:
            (scratch / "weights").write_bytes(weights)
    assert listing(adapter)["weights"] == b"second"
    with pytest.raises(OSError, match="disk full"), output_directory(adapter, "comet-ds train", overwrite=True):
        raise OSError("disk full")
    assert listing(adapter)["weights"] == b"second" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]

    (adapter / OUTPUT_MARKER).unlink()  # an adapter directory from elsewhere
    with pytest.raises(OutputDirectoryError, match="not empty"), \
            output_directory(adapter, "comet-ds train", overwrite=True):
        pass
    assert listing(adapter) == {"weights": b"second"}
