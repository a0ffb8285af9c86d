import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from comet_ds.config import CometConfig, CometConfigError, CometTokens, _known_fields
from comet_ds.configs import example_run_config


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"global_slots": 0}, "global_slots must be >= 1"),
        ({"chunk_size": 0}, "chunk_size must be >= 1"),
        ({"temp_stride": 0}, "temp_stride must be >= 1, or -1"),
        ({"temp_stride": -2}, "temp_stride must be >= 1, or -1"),
        ({"chunk_size": 4, "temp_stride": 8}, "must not exceed chunk_size"),
        ({"temp_budget": 0}, "temp_budget must be >= 1 while the temporary memory is on"),
        ({"bottleneck_rank": 0}, "bottleneck_rank must be >= 1"),
        ({"memory_lr_multiplier": 0}, "memory_lr_multiplier must be a positive number"),
        ({"chunk_size": 2.5}, "chunk_size must be an integer"),
    ],
)
def test_bad_values_are_rejected_naming_the_setting(values, message):
    with pytest.raises(CometConfigError, match=message):
        CometConfig(**values)


def test_budget_need_not_be_a_multiple_of_the_beacons_per_chunk():
    config = CometConfig(chunk_size=16, global_slots=4, temp_stride=4, temp_budget=10)
    assert config.beacons_per_chunk == 4
    assert [config.queue_length(t) for t in range(4)] == [0, 4, 8, 10]


def test_temp_memory_can_be_disabled():
    config = CometConfig(chunk_size=16, global_slots=2, temp_stride=-1, temp_budget=0)
    assert config.beacons_per_chunk == 0
    assert config.chunk_length == 16 + 2 * 2


def test_paper_defaults_give_the_paper_chunk_length():
    # C + C/s + 2G + Q = 2048 + 256 + 1024 + 2048
    assert CometConfig().chunk_length == 5376


def test_unknown_keys_get_a_suggestion():
    with pytest.raises(CometConfigError, match="did you mean 'chunk_size'"):
        CometConfig.from_dict({"chunk_sise": 16})


def test_round_trip_through_dicts():
    config = CometConfig(chunk_size=32, global_slots=3, temp_stride=8, temp_budget=12)
    assert CometConfig.from_dict(config.to_dict()) == config
    tokens = CometTokens(placeholder_id=5, temp_beacon_id=6, global_beacon_ids=(7, 8, 9), pad_id=0)
    assert CometTokens.from_dict(tokens.to_dict()) == tokens


def test_tokens_must_match_the_number_of_global_slots():
    tokens = CometTokens(placeholder_id=5, temp_beacon_id=6, global_beacon_ids=(7, 8), pad_id=0)
    with pytest.raises(CometConfigError, match="2 global beacon tokens but global_slots is 3"):
        tokens.check_against(CometConfig(chunk_size=16, global_slots=3, temp_stride=4, temp_budget=8))


def test_run_config_values_are_typed_and_wrong_types_name_the_setting():
    from comet_ds.train.config import load_run_config

    example = Path(str(example_run_config()))
    run = load_run_config(example, ["train.lr=1e-3", "train.max_tokens=null", "tracking.run_name=2024"])
    assert run.train.lr == 0.001 and isinstance(run.train.lr, float)  # YAML 1.1 reads 1e-3 as a string
    assert run.train.max_tokens is None and run.tracking.run_name == "2024"
    for override, message in [("train.lr=fast", "train.lr must be a number (got 'fast')"),
                              ("train.steps=1.5", "train.steps must be a whole number (got 1.5)"),
                              ("train.group_by_length=3", "train.group_by_length must be true or false"),
                              ("pipeline.bptt_window=all", "bptt_window must be a whole number or null"),
                              ("comet.chunk_size=[1]", "comet.chunk_size must be a whole number")]:
        with pytest.raises(CometConfigError, match=re.escape(message)):
            load_run_config(example, [override])


def test_accumulation_is_a_run_setting_checked_with_the_config(tmp_path):
    from comet_ds.train.config import load_run_config

    example = Path(str(example_run_config()))
    assert load_run_config(example, ["train.accumulation_steps=4"]).train.accumulation_steps == 4
    with pytest.raises(CometConfigError, match=re.escape("train.accumulation_steps must be >= 1 (got 0)")):
        load_run_config(example, ["train.accumulation_steps=0"])
    deepspeed_json = tmp_path / "ds.json"
    deepspeed_json.write_text('{"gradient_accumulation_steps": 4}')
    run = load_run_config(example, [f"deepspeed_config={deepspeed_json}"])
    with pytest.raises(CometConfigError, match=re.escape(
            "sets 'gradient_accumulation_steps'; remove it and set train.accumulation_steps in the run config")):
        run.deepspeed_dict()


# this module does not postpone annotations (no `from __future__ import annotations`), so these field
# types are classes, not the strings "int", "float | None", ...
@dataclass(frozen=True)
class PlainSettings:
    count: int = 1
    rate: float = 0.5
    label: Optional[str] = None  # noqa: UP045  (the typing spelling of `str | None` is checked too)
    limit: int | None = None
    flag: bool = False


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"count": "many"}, "plain.count must be a whole number (got 'many')"),
        ({"count": True}, "plain.count must be a whole number (got True)"),  # bool is no integer here
        ({"count": 1.5}, "plain.count must be a whole number (got 1.5)"),
        ({"rate": "fast"}, "plain.rate must be a number (got 'fast')"),
        ({"label": [1]}, "plain.label must be a string or null (got [1])"),
        ({"limit": "all"}, "plain.limit must be a whole number or null (got 'all')"),
        ({"flag": 3}, "plain.flag must be true or false (got 3)"),
    ],
)
def test_types_are_checked_when_annotations_are_not_strings(values, message):
    assert PlainSettings.__dataclass_fields__["count"].type is int
    with pytest.raises(CometConfigError, match=re.escape(message)):
        _known_fields(PlainSettings, values, "plain")


def test_scalars_from_yaml_become_the_field_type():
    values = {"count": 2, "rate": "1e-3", "label": 2024, "limit": None, "flag": True}
    assert _known_fields(PlainSettings, values, "plain") == {"count": 2, "rate": 0.001, "label": "2024",
                                                              "limit": None, "flag": True}
    assert _known_fields(PlainSettings, {"rate": 3}, "plain") == {"rate": 3}  # a whole number is a number


def test_learning_rate_schedules_warm_up_then_decay_or_hold():
    from comet_ds.schedule import warmup_schedule

    cosine, constant = warmup_schedule(2, 6), warmup_schedule(2, 6, "constant")
    assert [cosine(step) for step in range(7)] == pytest.approx([0, 0.5, 1, 0.853553, 0.5, 0.146447, 0], abs=1e-6)
    assert [constant(step) for step in range(7)] == [0, 0.5, 1, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'linear'"):
        warmup_schedule(2, 6, "linear")
