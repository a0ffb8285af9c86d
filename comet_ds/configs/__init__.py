"""Config files shipped inside the package, so an installed comet_ds finds them as well as a checkout:
DeepSpeed layouts in deepspeed/*.json (the checkout's ds_configs/ links here), example run configs
and the passkey recipe in run/*.yaml. A run config's deepspeed_config may name a packaged layout by its short name."""

from __future__ import annotations

from importlib.resources import files
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importlib.resources.abc is new in Python 3.11
    from importlib.resources.abc import Traversable


def packaged_deepspeed_configs() -> list[str]:
    """The short names a run config's deepspeed_config may use, e.g. cpu_fp32_2stage."""
    folder = files(__name__) / "deepspeed"
    return sorted(entry.name.removesuffix(".json") for entry in folder.iterdir() if entry.name.endswith(".json"))


def names_packaged_config(value: str) -> bool:
    """A deepspeed_config without a path separator or .json suffix is a packaged config's short name."""
    return not value.endswith(".json") and "/" not in value and "\\" not in value


def packaged_deepspeed_config(name: str) -> Traversable:
    available = packaged_deepspeed_configs()
    if name not in available:
        raise FileNotFoundError(f"deepspeed_config {name!r} is not a packaged DeepSpeed config; name one of "
                                f"{', '.join(available)} or give the path of a .json file")
    return files(__name__) / "deepspeed" / f"{name}.json"


def passkey_recipe() -> Traversable:
    """The staged passkey recipe `comet-ds demo` runs: shared run settings and one entry per stage."""
    return files(__name__) / "run" / "passkey_recipe.yaml"


def example_run_config() -> Traversable:
    """The complete example run config: a tiny base on 2 CPU pipeline stages (`comet-ds train --help`)."""
    return files(__name__) / "run" / "tiny_cpu.yaml"
