"""Run notifications without a server: a webhook URL is shown as its host only and never
repeated in an error, the machine's settings are checked, and each event's message says what
happened in one line (its cost from the instance's price)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.contract import layout
from trainer.contract.notify import Settings, check_webhook, redact
from trainer.machine.notify import message

SECRET = "T0AAA/B0BBB/XOXsecret"


@pytest.mark.parametrize("url, shown", [
    (f"https://hooks.slack.com/services/{SECRET}", "https://hooks.slack.com/..."),
    (f"http://127.0.0.1:8080/hook?token={SECRET}", "http://127.0.0.1:8080/..."),
    ("https://example.com", "https://example.com"),
    (f"https://[::1]:9/{SECRET}", "https://[::1]:9/..."),
])
def test_a_webhook_is_shown_as_its_scheme_and_host(url: str, shown: str) -> None:
    assert check_webhook(url) == url and redact(url) == shown


@pytest.mark.parametrize("url", [f"ftp://h/{SECRET}", f"https://u:{SECRET}@h/x", f"https://h/{SECRET} x",
                                 f"https://h:99999/{SECRET}", f"https:///{SECRET}", f"https://h/{SECRET}\x1b[2J", ""])
def test_a_bad_webhook_is_refused_without_repeating_it(url: str) -> None:
    with pytest.raises(ValueError) as refused:
        check_webhook(url)
    assert "XOXsecret" not in str(refused.value)


@pytest.mark.parametrize("data", [b"", b"[]", b'{"webhook": "ftp://x/y"}', b'{"webhook": "https://h/x", "on": ["done"]}',
                                  b'{"webhook": "https://h/x", "on": "finished"}', b"x" * 20000])
def test_the_machine_refuses_settings_that_are_not_settings(data: bytes) -> None:
    with pytest.raises(ValueError, match="^notify settings: |webhook|http"):
        Settings.parse(data)


def test_settings_travel_whole_and_an_odd_price_or_host_is_dropped() -> None:
    given = Settings("https://h.example/x", ("failed",), 1.006, "i-0abc")
    assert Settings.parse(given.to_bytes()) == given
    odd = json.dumps({"webhook": "https://h.example/x", "hourly_usd": "1.0", "host": "a\x1bb"}).encode()
    assert Settings.parse(odd) == Settings("https://h.example/x", hourly_usd=None, host=None)


def run_folder(tmp_path: Path, status: dict, started: str | None = "2026-12-01T10:00:00+00:00") -> Path:
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / layout.STATUS).write_text(json.dumps({"epochs": 20, "updated_at": "2026-12-01T12:30:00+00:00", **status}))
    if started is not None:
        (run / layout.RUN_JSON).write_text(json.dumps({"started_at": started}))
    return run


@pytest.mark.parametrize("event, status, text", [
    ("finished", {"epoch": 20, "best_val_accuracy": 0.61234, "best_epoch": 12},
     "orch: run r1 finished on i-0abc after 20 of 20 epochs: best val_accuracy 0.6123 at epoch 12 (2.5 h, about "
     "$2.50)"),
    ("failed", {"epoch": 3, "error": "NaN loss\x1b[31m at\nbatch 4", "best_val_accuracy": None},
     "orch: run r1 failed on i-0abc at epoch 3 of 20: NaN loss [31m at batch 4; no epoch finished yet (2.5 h, about "
     "$2.50)"),
    ("interrupted", {"epoch": 5, "best_val_accuracy": 0.5, "best_epoch": 5},
     "orch: run r1 interrupted on i-0abc by a spot notice at epoch 5 of 20; best val_accuracy 0.5000 at epoch 5 (2.5 h, "
     "about $2.50); it continues from there once recovered"),
])
def test_each_end_is_one_line_with_its_facts_and_cost(tmp_path: Path, event: str, status: dict, text: str) -> None:
    sent = message(event, run_folder(tmp_path, status), Settings("https://h/x", hourly_usd=1.0, host="i-0abc"))
    assert sent["text"] == text
    assert sent["run_id"] == "r1" and sent["state"] == event and sent["elapsed_seconds"] == 9000.0
    assert sent["hourly_usd"] == 1.0 and sent["cost_usd"] == 2.5 and sent["host"] == "i-0abc"


def test_a_recovery_is_told_with_its_record_and_without_a_price_no_cost(tmp_path: Path) -> None:
    run = run_folder(tmp_path, {"state": "interrupted", "epoch": 5, "best_val_accuracy": 0.5, "best_epoch": 4})
    record = {"at": "2026-12-01T12:00:00+00:00", "why": "EC2 took the spot instance", "epoch_restored": 5}
    sent = message("recovered", run, Settings("https://h/x", host="i-0new"), record)
    assert sent["text"].startswith("orch: run r1 recovered on i-0new (EC2 took the spot instance): continuing from "
                                   "epoch 5 of 20; best val_accuracy 0.5000 at epoch 4 (")
    assert sent["recovery"] == record and sent["cost_usd"] is None and sent["elapsed_seconds"] > 0
