"""data_prep.common: balanced work per rank, argument types, a step's command in one line."""

from __future__ import annotations

from argparse import ArgumentTypeError

import pytest

from data_prep.common import balance, fraction, positive_int, run_command


def test_balance_gives_every_index_once_largest_first_to_the_least_loaded():
    sizes = [5, 1, 9, 3, 3, 7]
    owned = balance(sizes, 3)
    assert sorted(i for o in owned for i in o) == list(range(6))
    loads = [sum(sizes[i] for i in o) for o in owned]
    assert max(loads) - min(loads) <= max(sizes)  # greedy: within one file of even
    assert owned == balance(sizes, 3)  # deterministic
    assert balance([4, 4], 4) == [[0], [1], [], []]  # more ranks than files


def test_argument_types_name_the_bad_value():
    assert positive_int("3") == 3 and fraction("0.25") == 0.25
    with pytest.raises(ArgumentTypeError, match="must be 1 or more, got 0"):
        positive_int("0")
    with pytest.raises(ArgumentTypeError, match=r"must lie in \[0, 1\), got 1.5"):
        fraction("1.5")


def test_a_commands_bad_input_is_one_logged_line_and_exit_2(caplog):
    def bad() -> None:
        raise FileNotFoundError("input 'books/' matches no file or directory")

    assert run_command(bad) == 2
    assert caplog.messages == ["input 'books/' matches no file or directory"]
    assert run_command(lambda: None) == 0
