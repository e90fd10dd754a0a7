"""The toy world as an extension of umo (entry point `umo.extensions` in pyproject.toml): its params.yaml
sections and its `umo` subcommands. The product reads these through `umo.config.extensions()`."""

from __future__ import annotations

from umo.toy import cli
from umo.toy.config import AblationConfig, ToyBaseConfig, ToyWorldConfig

SECTIONS = {"toyworld": ToyWorldConfig, "toybase": ToyBaseConfig, "ablation": AblationConfig}


def add_commands(sub) -> None:
    """Add `umo toyworld|toybase|generator|ablation` to the product's subparsers."""
    cli.add_commands(sub)
