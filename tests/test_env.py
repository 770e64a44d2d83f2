"""gpt1_ds.env: the tested torch and DeepSpeed releases, stated once and checked at start."""

from __future__ import annotations

import logging
import re

import deepspeed
import pytest
import tomllib
import torch
from conftest import REPO

from gpt1_ds import env
from gpt1_ds.env import TESTED, UntestedVersions, check_versions, untested_versions


def test_the_installed_releases_are_the_tested_ones():
    assert untested_versions({"torch": torch.__version__, "deepspeed": deepspeed.__version__}) == []
    check_versions(allow_untested=False)  # what every run does first


@pytest.mark.parametrize(
    ("versions", "flagged"),
    [
        ({"torch": "2.13.0+cpu", "deepspeed": "0.19.8"}, []),
        ({"torch": "2.13.1+cu130", "deepspeed": "0.19.12"}, []),
        ({"torch": "2.5.1+cu124", "deepspeed": "0.19.8"}, ["torch 2.5.1+cu124"]),
        ({"torch": "2.13.0", "deepspeed": "0.20.0"}, ["deepspeed 0.20.0"]),
        ({"torch": "2.1.0", "deepspeed": "0.15.4"}, ["torch 2.1.0", "deepspeed 0.15.4"]),
    ],
)
def test_untested_releases_are_named(versions, flagged):
    assert untested_versions(versions) == flagged


def test_an_untested_release_stops_the_run_unless_allowed(monkeypatch, caplog):
    monkeypatch.setitem(env.TESTED, "torch", "2.5")
    with pytest.raises(UntestedVersions) as e:
        check_versions(allow_untested=False)
    assert f"torch {torch.__version__}: gpt1-ds is tested with torch 2.5 with deepspeed 0.19" in str(e.value)
    assert "allow_untested_versions=true" in str(e.value)
    with caplog.at_level(logging.WARNING):
        check_versions(allow_untested=True)
    assert "running anyway" in caplog.text


def test_constraints_pyproject_and_the_table_agree():
    pins = dict(re.findall(r"^(\w+)==(\S+)$", (REPO / "constraints.txt").read_text(), re.M))
    assert set(pins) == set(TESTED)
    for name, version in pins.items():
        assert version.startswith(TESTED[name] + "."), name
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for name, minor in TESTED.items():
        (spec,) = [d for d in deps if re.match(rf"{name}\b", d)]
        low, high = re.findall(r"[\d.]+", spec)
        assert pins[name].startswith(low) or low.startswith(minor), spec
        major, minor_n = map(int, minor.split("."))
        assert high == f"{major}.{minor_n + 1}", spec
