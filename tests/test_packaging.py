"""The built wheel is the whole product: every package, the packaged configs, and commands that train
from an install where the checkout is not importable."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from comet_ds.configs import example_run_config, packaged_deepspeed_configs

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("comet_ds", "data_prep")


def package_dirs() -> list[Path]:
    """Every folder of the source packages that holds Python modules, relative to the checkout."""
    return sorted({path.parent.relative_to(REPO) for name in PACKAGES for path in (REPO / name).rglob("*.py")})


def test_every_folder_with_modules_is_a_package():
    assert [str(folder) for folder in package_dirs() if not (REPO / folder / "__init__.py").is_file()] == []


def test_the_checkout_ds_configs_are_the_packaged_ones():
    """ds_configs/ and launch/examples/tiny_cpu.yaml are links into the package: one copy of each file."""
    assert sorted(path.stem for path in (REPO / "ds_configs").glob("*.json")) == packaged_deepspeed_configs()
    assert (REPO / "ds_configs").resolve() == (REPO / "comet_ds" / "configs" / "deepspeed")
    assert (REPO / "launch" / "examples" / "tiny_cpu.yaml").resolve() == Path(str(example_run_config()))


def test_the_makefile_torch_pin_lies_in_the_supported_range():
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    requirements = [Requirement(line) for line in setup["options"]["install_requires"].split("\n") if line]
    torch_range = next(r.specifier for r in requirements if r.name == "torch")
    pin = re.search(r"^TORCH_CPU := (\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE).group(1)
    assert pin in torch_range, f"Makefile TORCH_CPU {pin} is outside setup.cfg's torch{torch_range}"


def run(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of the checkout's files (tracked, or new and not ignored), so that
    no earlier build/ folder of the checkout leaks into it."""
    root = tmp_path_factory.mktemp("wheel")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    source = root / "source"
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_symlink() or (REPO / name).is_file():  # a deleted, not yet staged file is skipped
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name, follow_symlinks=False)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root), "."],
        cwd=source, env=os.environ.copy())
    (built,) = root.glob("comet_ds-*.whl")
    return built


def test_the_wheel_holds_every_package_and_the_packaged_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f"{folder.as_posix()}/__init__.py" for folder in package_dirs()
               if f"{folder.as_posix()}/__init__.py" not in names]
    assert missing == [], f"packages left out of the wheel: {missing}"
    configs = {f"comet_ds/configs/deepspeed/{name}.json" for name in packaged_deepspeed_configs()}
    assert configs | {"comet_ds/configs/run/tiny_cpu.yaml"} <= names


def test_an_installed_wheel_prepares_data_and_checks_a_run_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        cwd=tmp_path, env=os.environ.copy())
    # only the install is importable: another folder, PYTHONPATH naming the install alone
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    located = run([sys.executable, "-c", "import comet_ds, data_prep; print(comet_ds.__file__, data_prep.__file__)"],
                  cwd=tmp_path, env=env).split()
    assert all(Path(path).is_relative_to(site) for path in located), located

    def command(script: str, *args: str) -> str:
        return run([sys.executable, str(site / "bin" / script), *args], cwd=tmp_path, env=env)

    command("comet-ds", "init-base", "--out", "base", "--shipped")  # its files' hashes are checked on the way
    command("comet-prep", "passkey", "--tokenizer", "base", "--lengths", "512", "--depths", "2",
            "--samples-per-cell", "1", "--output", "passkey", "--quiet")
    # the packaged example run config, pointed at this data, with a packaged DeepSpeed config by name
    run_config = yaml.safe_load(Path(str(example_run_config())).read_text(encoding="utf-8"))
    assert run_config["deepspeed_config"] == "cpu_fp32_2stage"
    run_config.update(base_model="base", dataset="passkey", output_dir="train")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run_config))
    dry_run = command("comet-ds", "train", "--config", "run.yaml", "--dry-run")
    assert '"stages": 2' in dry_run and "pipeline: 2 stage(s)" in dry_run
    assert "usage: comet-prep" in command("comet-prep", "--help")
    assert str(site) in command("comet-ds", "train", "--help")  # the example run config it shows is installed
