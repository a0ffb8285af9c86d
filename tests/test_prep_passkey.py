import hashlib
import json
from pathlib import Path

import pytest
from datasets import load_from_disk
from transformers import AutoTokenizer

from data_prep.cli import main


def test_passkey_dataset_has_exact_lengths_and_only_the_answer_trained(base_dirs, tmp_path, capsys):
    out = tmp_path / "passkey"
    main(["passkey", "--tokenizer", base_dirs["llama"], "--lengths", "300,600", "--depths", "3",
          "--samples-per-cell", "2", "--seed", "7", "--output", str(out)])
    assert "wrote 12 passkey samples" in capsys.readouterr().out
    data = load_from_disk(str(out / "data"))
    tokenizer = AutoTokenizer.from_pretrained(base_dirs["llama"])
    assert sorted(set(data["length"])) == [300, 600]
    assert sorted(set(data["depth"])) == [0.0, 0.5, 1.0]
    for row in data:
        assert len(row["input_ids"]) == len(row["labels"]) == row["length"]
        trained = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
        assert tokenizer.decode(trained).strip() == row["answer"]  # exactly the key's digits
        assert f"The pass key is {row['answer']}." in row["text"]
    assert data["sample_id"] == [f"passkey-{i}" for i in range(12)]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 12 and manifest["tokens"]["total"] == 6 * 300 + 6 * 600
    # the tokenizer's files, name then bytes in name order: what training compares with its base's
    expected = hashlib.sha256()
    for path in sorted(Path(base_dirs["llama"]).glob("tokenizer*")):
        expected.update(path.name.encode() + path.read_bytes())
    assert manifest["tokenizer_sha256"] == expected.hexdigest()


def test_same_seed_same_samples(base_dirs, tmp_path):
    for name in ("a", "b"):
        main(["passkey", "--tokenizer", base_dirs["llama"], "--lengths", "200", "--depths", "0.3",
              "--samples-per-cell", "3", "--seed", "1", "--output", str(tmp_path / name)])
    a, b = (tmp_path / n / "data" for n in "ab")
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir()) and any(f.endswith(".arrow") for f in files)
    for name in files:  # the dataset itself is byte-identical
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_too_short_is_one_clear_line(base_dirs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["passkey", "--tokenizer", base_dirs["llama"], "--lengths", "20", "--output", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "too short for a passkey sample" in capsys.readouterr().err


def test_needle_samples_ask_for_the_named_number(base_dirs, tmp_path, capsys):
    main(["needle", "--tokenizer", base_dirs["llama"], "--lengths", "400", "--depths", "0.2,0.8",
          "--seed", "1", "--output", str(tmp_path / "needle")])
    assert "wrote 2 needle samples" in capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(base_dirs["llama"])
    for row in load_from_disk(str(tmp_path / "needle" / "data")):
        assert len(row["input_ids"]) == 400 and len(row["answer"]) == 7
        word = row["text"].split("special magic number for ")[-1].split(" mentioned")[0]
        assert f"One of the special magic numbers for {word} is: {row['answer']}." in row["text"]
        trained = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
        assert tokenizer.decode(trained).strip() == row["answer"]


def test_lengths_over_max_tokens_are_refused(base_dirs, tmp_path):
    with pytest.raises(SystemExit, match="--lengths reach 4,096 tokens, over --max-tokens 2,048"):
        main(["passkey", "--tokenizer", base_dirs["llama"], "--lengths", "1k,4k", "--max-tokens", "2k",
              "--output", str(tmp_path / "x")])


def test_depth_ranges_draw_each_samples_depth_within_the_range(base_dirs, tmp_path, capsys):
    out = tmp_path / "ranges"
    main(["passkey", "--tokenizer", base_dirs["llama"], "--lengths", "400", "--depths", "0-0.1,0.5,0.6-0.9",
          "--samples-per-cell", "4", "--seed", "3", "--output", str(out)])
    data = load_from_disk(str(out / "data"))
    first, fixed, last = (data["depth"][k:k + 4] for k in (0, 4, 8))
    assert all(0.0 <= d <= 0.1 for d in first) and len(set(first)) == 4
    assert fixed == [0.5] * 4
    assert all(0.6 <= d <= 0.9 for d in last) and len(set(last)) == 4
    for row in data:  # the key sits where the drawn depth says
        key_at = row["text"].index(f"The pass key is {row['answer']}.") / len(row["text"])
        assert abs(key_at - row["depth"]) < 0.15
    assert json.loads((out / "manifest.json").read_text())["depths"] == [[0.0, 0.1], 0.5, [0.6, 0.9]]


@pytest.mark.parametrize("bad", ["0.5-0.2", "0.2-1.5", "a-0.3"])
def test_bad_depth_ranges_are_one_usage_line(base_dirs, tmp_path, capsys, bad):
    with pytest.raises(SystemExit) as exit_info:
        main(["passkey", "--tokenizer", base_dirs["llama"], "--depths", bad, "--output", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "argument --depths: depth" in capsys.readouterr().err


def test_held_out_keys_never_appear_and_every_other_sample_is_unchanged(base_dirs, tmp_path, capsys):
    def answers(out: Path, *extra: str) -> list[str]:
        main(["passkey", "--tokenizer", base_dirs["llama"], "--lengths", "200", "--depths", "4",
              "--samples-per-cell", "3", "--seed", "5", "--quiet", "--output", str(out), *extra])
        return load_from_disk(str(out / "data"))["answer"]

    free = answers(tmp_path / "free")
    held_out = free[::2]  # every other sample's key
    (tmp_path / "keys.txt").write_text("\n".join(held_out) + "\n")
    kept = answers(tmp_path / "kept", "--hold-out-keys", str(tmp_path / "keys.txt"))
    assert not set(kept) & set(held_out)
    assert kept[1::2] == free[1::2]  # a sample whose key was not held out draws the same one
    assert json.loads((tmp_path / "kept" / "manifest.json").read_text())["held_out_keys"] == len(set(held_out))
    (tmp_path / "bad.txt").write_text("12345\nnot-a-key\n")
    with pytest.raises(SystemExit, match="'not-a-key' is not a key"):
        answers(tmp_path / "bad", "--hold-out-keys", str(tmp_path / "bad.txt"))
    (tmp_path / "all.txt").write_text("\n".join(map(str, range(10000, 100000))))  # drawing would never end
    with pytest.raises(SystemExit, match="holds every passkey key from 10000 to 99999"):
        answers(tmp_path / "all", "--hold-out-keys", str(tmp_path / "all.txt"))
