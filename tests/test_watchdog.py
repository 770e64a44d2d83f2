"""gpt1_ds/watchdog.py: the preflight's hold (the stall itself is tested on real ranks in
test_train.py and test_slurm.py)."""

from __future__ import annotations

import logging

from gpt1_ds import watchdog


def test_the_hold_waits_for_the_signal_at_its_step_only(monkeypatch):
    monkeypatch.setenv("GPT1_DS_HOLD_AT", "15")
    polls, beats = [], []

    def signalled() -> bool:
        polls.append(1)
        return len(polls) > 3  # USR1 arrives during the fourth wait

    watchdog.hold_for_signal(15, 0, signalled, beats.append)
    assert len(polls) == 4 and beats == ["waiting for a signal after step 15 (GPT1_DS_HOLD_AT)"] * 3
    for step, first in ((10, 0), (20, 0), (15, 15), (15, 20)):  # another step, or a resumed run
        watchdog.hold_for_signal(step, first, lambda: False, beats.append)
    assert len(beats) == 3
    monkeypatch.delenv("GPT1_DS_HOLD_AT")
    watchdog.hold_for_signal(15, 0, lambda: False, beats.append)
    assert len(beats) == 3


def test_a_hold_without_a_signal_gives_up_and_the_run_goes_on(monkeypatch, caplog):
    monkeypatch.setenv("GPT1_DS_HOLD_AT", "5")
    monkeypatch.setattr(watchdog, "HOLD_LIMIT", 0.2)
    with caplog.at_level(logging.WARNING):
        watchdog.hold_for_signal(5, 0, lambda: False, lambda _: None)
    assert "step 5: no signal in 0 s (GPT1_DS_HOLD_AT); going on" in caplog.text
