"""What several command groups share: the checked settings of ``serve`` and ``embed``, and the
type of the sub-parser table every group registers itself on."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from polyray.config import Settings, load_settings

if TYPE_CHECKING:
    # argparse's sub-parser table; generic for the type checker only (not subscriptable at run time).
    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]


def load_checked_settings(config: str | None) -> Settings:
    """The config file (or the embedded defaults) with every model's files checked now, so a
    broken model path ends the command with one line and exit 2 before anything starts."""
    settings = load_settings(config)
    from polyray.backends.factory import check_model

    for model in settings.models:
        check_model(model)
    return settings
