"""``polyray.cli``'s argument handling that every command shares, without subprocesses."""

from __future__ import annotations

import argparse
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from polyray import cli
from polyray.cli import build_parser, embed, join_dash_values
from polyray.config import ModelConfig, Settings


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["usage", "report", "--since", "-7d"], ["usage", "report", "--since=-7d"]),
        (["usage", "report", "--since", "-7d", "--until", "-1h"], ["usage", "report", "--since=-7d", "--until=-1h"]),
        (["usage", "report", "--since", "2026-01-05"], ["usage", "report", "--since", "2026-01-05"]),
        (["usage", "report", "--since=-7d"], ["usage", "report", "--since=-7d"]),
        (["usage", "report", "--since", "--by", "client"], ["usage", "report", "--since", "--by", "client"]),
        (["usage", "report", "--since", "-"], ["usage", "report", "--since", "-"]),
        (["usage", "report", "--since"], ["usage", "report", "--since"]),
        (["embed", "--", "--since", "-7d"], ["embed", "--", "--since", "-7d"]),  # after --: texts, not options
    ],
)
def test_time_values_starting_with_a_dash_are_joined(argv: list[str], expected: list[str]) -> None:
    assert join_dash_values(argv) == expected


tokens = st.lists(st.sampled_from(["--since", "--until", "-7d", "-24h", "--by", "client", "x", "--", "-", "-1"]))


@given(tokens)
def test_joining_only_merges_a_time_option_with_its_value(argv: list[str]) -> None:
    joined = join_dash_values(argv)
    # Nothing is lost or reordered: splitting the joined tokens back gives the input.
    split = [part for token in joined for part in (token.split("=", 1) if "=" in token else [token])]
    assert split == argv
    assert all(token.split("=", 1)[0] in cli.DASH_VALUE_OPTIONS for token in joined if "=" in token)
    assert join_dash_values(joined) == joined  # idempotent


def test_the_readme_usage_line_parses() -> None:
    args = build_parser().parse_args(join_dash_values(["usage", "report", "--since", "-7d", "--by", "client"]))
    assert (args.since, args.by) == ("-7d", "client")


def test_embed_fits_no_batch_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-shot command: seconds of budget measurement cannot pay for a few texts."""
    seen: list[Settings] = []

    class Stop(Exception):
        pass

    def fake_build_engine(settings: Settings, *_: Any, **__: Any) -> Any:
        seen.append(settings)
        raise Stop

    fitted = Settings(
        models=(ModelConfig(backend="dummy", fit_batch_budget=True), ModelConfig(name="b", backend="dummy"))
    )
    monkeypatch.setattr(embed, "load_checked_settings", lambda config: fitted)
    monkeypatch.setattr("polyray.engine.build.build_engine", fake_build_engine)
    with pytest.raises(Stop):
        embed.cmd_embed(argparse.Namespace(config=None, model="minilm", texts=["a", "b"]))
    assert [m.fit_batch_budget for m in seen[0].models] == [False, False]
    assert [m.name for m in seen[0].models] == ["minilm", "b"]


def test_every_command_group_is_registered_in_help_order() -> None:
    """One module per group under ``polyray.cli``; moving them must not drop or reorder a command."""
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert list(commands.choices) == ["serve", "embed", "bench", "clients", "usage", "heads"]
