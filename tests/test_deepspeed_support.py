"""The DeepSpeed releases comet_ds supports: stated once, checked at import against the hooks the engine uses."""

from __future__ import annotations

import configparser
import os
import re
import subprocess
import sys
from pathlib import Path

import deepspeed
import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from comet_ds.pipeline.engine import (
    DEEPSPEED_HOOKS,
    SUPPORTED_DEEPSPEED,
    _installed_owners,
    check_deepspeed,
    missing_deepspeed_hooks,
)

REPO = Path(__file__).resolve().parents[1]


def test_setup_cfg_requires_the_supported_releases_and_this_one_is_among_them():
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    requirements = [Requirement(line) for line in setup["options"]["install_requires"].split("\n") if line]
    assert next(r.specifier for r in requirements if r.name == "deepspeed") == SpecifierSet(SUPPORTED_DEEPSPEED)
    assert deepspeed.__version__ in SpecifierSet(SUPPORTED_DEEPSPEED)


def test_the_installed_deepspeed_has_every_hook():
    assert missing_deepspeed_hooks(_installed_owners()) == []


def test_a_deepspeed_without_a_hook_is_refused_naming_the_supported_releases():
    owners = _installed_owners()
    kept = {name: getattr(owners["PipelineEngine"], name) for name in DEEPSPEED_HOOKS["PipelineEngine"]
            if name != "_train_schedule"}
    owners["PipelineEngine"] = type("PipelineEngine", (), kept)
    with pytest.raises(ImportError, match=re.escape(
            f"DeepSpeed 0.15.4 lacks PipelineEngine._train_schedule, which comet_ds's pipeline engine relies on; "
            f"install a supported release: pip install 'deepspeed{SUPPORTED_DEEPSPEED}'")):
        check_deepspeed(owners, "0.15.4")


def test_the_check_runs_when_the_engine_module_is_imported():
    # the real DeepSpeed with one hook taken away, as a release that renamed it would be
    code = ("import deepspeed.runtime.pipe.engine as e; del e.PipelineEngine._train_schedule; "
            "import comet_ds.pipeline.engine")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert done.returncode != 0
    assert "lacks PipelineEngine._train_schedule" in done.stderr
    assert f"deepspeed{SUPPORTED_DEEPSPEED}" in done.stderr
