import pytest
from transformers import AutoTokenizer

from data_prep.cli import main
from data_prep.tokens import TextEncoder

TEXTS = ["Activity log of user 7 (3 events):\n2017-11-25 00:00:01 viewed item 12 (category 4)\n",
         "  leading spaces and\ttabs", "émoji 🙂 ünïcödé", "\nQuestion: which item?\nAnswer:", " 12345", "",
         "literal <s> and </s> and <pad> in text", "[step 3] tool (call-1): {\"result\": \"value7\"}"]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_the_tokenizer_file_gives_the_ids_and_text_transformers_gives(base_dirs, arch):
    reference, encoder = AutoTokenizer.from_pretrained(base_dirs[arch]), TextEncoder(base_dirs[arch])
    expected = [reference(t, add_special_tokens=False, split_special_tokens=True).input_ids for t in TEXTS]
    assert encoder.encode_batch(TEXTS) == expected
    assert [encoder.encode(t) for t in TEXTS] == expected
    assert [encoder.decode(ids) for ids in expected] == [reference.decode(ids) for ids in expected]


def test_a_damaged_tokenizer_file_is_one_clear_line(base_dirs, tmp_path):
    broken = tmp_path / "tok"
    broken.mkdir()
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(SystemExit, match=r"--tokenizer .*: not a tokenizer directory \("):
        main(["passkey", "--tokenizer", str(broken), "--lengths", "300", "--output", str(tmp_path / "o")])


def test_settings_transformers_applies_at_load_take_the_transformers_path(base_dirs, tmp_path):
    import json
    import shutil

    copy = tmp_path / "tok"
    shutil.copytree(base_dirs["llama"], copy)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, "add_prefix_space": False}))  # changes ids
    reference = AutoTokenizer.from_pretrained(copy)
    expected = [reference(t, add_special_tokens=False, split_special_tokens=True).input_ids for t in TEXTS]
    assert TextEncoder(copy).encode_batch(TEXTS) == expected
