"""Run notifications, sent from the machine (so they arrive with the laptop closed):

    notify test          (the settings on stdin)   -> Delivery: one test message, as a run sends it

A trainer orch launched finds its settings where the launcher wrote them
(trainer/contract/notify.py: ``$ORCH_NOTIFY_FILE``, a 0600 file under remote.root) and, when the
run ends ``finished``, ``failed`` or ``interrupted`` (or starts again with a recorded recovery:
``recovered``), POSTs one JSON object: a one-line ``text`` (what Slack's incoming webhooks show)
and the facts (run id, state, host, epochs, best val accuracy and its epoch, elapsed seconds, the
cost so far when the instance's price is known). Each try waits at most TIMEOUT seconds; a
connection failure, a timeout, HTTP 429 or 5xx is tried again with backoff, ATTEMPTS times in
all and never beyond DEADLINE seconds. Nothing here ever fails or stops a run: every problem is
one line of train.log, with the URL shown as its scheme and host only (the path is the secret).
Standard library only (urllib): the trainer's environment needs nothing more.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator  # typing's: subscripted at run time on python3 3.8

from trainer.contract import layout
from trainer.contract.notify import EVENTS, RECOVERED, SETTINGS_ENV, TEST, Settings, redact
from trainer.contract.wire import Delivery
from trainer.machine.readers import read_bytes, read_json

Log = Callable[[str], None]
TIMEOUT = 5.0  # seconds per try
ATTEMPTS = 3
BACKOFF = 1.0  # seconds before the second try, doubled before each next one
BACKOFF_ENV = "ORCH_NOTIFY_BACKOFF"  # a test hook: the first backoff, in seconds
DEADLINE = 20.0  # seconds for all tries of one message together
MAX_TEXT = 300  # characters of one error or reason quoted in a message
RETRIED = (429, 500, 502, 503, 504)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer, not a new address to POST to (urllib would GET it, bodiless)."""

    def redirect_request(self, *_args: Any, **_kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def _scrub(text: str, url: str) -> str:
    """An error message without the URL's secret (some of urllib's quote the URL)."""
    for secret in sorted({url, url.split("://", 1)[-1], *(p for p in url.split("/")[3:] if len(p) > 3)},
                         key=len, reverse=True):
        text = text.replace(secret, "...")
    return _line(text)


def _line(text: Any, limit: int = MAX_TEXT) -> str:
    """Printable, one line, bounded: an error text that goes into a chat message."""
    text = "".join(ch if ch.isprintable() else " " for ch in str(text)).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def post(url: str, body: bytes, *, attempts: int = ATTEMPTS, timeout: float = TIMEOUT,
         deadline: float = DEADLINE) -> Delivery:
    """POST ``body`` (JSON) to ``url``, trying again after a failure that may pass; never raises."""
    backoff = float(os.environ.get(BACKOFF_ENV, BACKOFF))
    ends = time.monotonic() + deadline
    status, error, tried = None, None, 0
    for tried in range(1, attempts + 1):
        left = ends - time.monotonic()
        request = urllib.request.Request(url, data=body, method="POST", headers={
            "Content-Type": "application/json", "User-Agent": "orch-notify"})
        try:
            with _OPENER.open(request, timeout=max(0.1, min(timeout, left))) as answer:
                answer.read(4096)
                status, error = answer.status, None
        except urllib.error.HTTPError as exc:
            status, error = exc.code, f"HTTP {exc.code}"
            exc.close()
        except (OSError, ValueError, urllib.error.URLError) as exc:  # refused, unreachable, timed out, bad URL
            status, error = None, _scrub(str(getattr(exc, "reason", exc)) or type(exc).__name__, url)
        except Exception as exc:  # http.client's odd answers: never the run's problem
            status, error = None, _scrub(f"{type(exc).__name__}: {exc}", url)
        if status is not None and 200 <= status < 300:
            return Delivery(True, status, tried, None, redact(url))
        if status is not None and status not in RETRIED:
            break  # 4xx: the same message would be refused again
        wait = backoff * 2 ** (tried - 1)
        if tried == attempts or time.monotonic() + wait >= ends:
            break
        time.sleep(wait)
    return Delivery(False, status, tried, error or (f"HTTP {status}" if status else "no answer"), redact(url))


# --------------------------------------------------------------------------- what a message says


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 90 * 60 else f"{seconds / 3600:.1f} h"


def _seconds_between(start: Any, end: Any) -> float | None:
    try:
        return max(0.0, (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds())
    except (TypeError, ValueError):
        return None


def message(event: str, run_dir: Path, settings: Settings, recovery: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON a webhook gets for ``event`` of the run in ``run_dir`` (from its status.json and
    run.json, as they are now)."""
    status, run = read_json(run_dir / layout.STATUS), read_json(run_dir / layout.RUN_JSON)
    now = datetime.now(timezone.utc)
    elapsed = _seconds_between(run.get("started_at"), status.get("updated_at") if event != RECOVERED else
                               now.isoformat())
    cost = round(settings.hourly_usd * elapsed / 3600, 4) if settings.hourly_usd is not None and elapsed is not None \
        else None
    fields = {
        "run_id": run_dir.name, "state": event, "host": settings.host or socket.gethostname(),
        "epoch": _int(status.get("epoch")), "epochs": _int(status.get("epochs")),
        "best_val_accuracy": _number(status.get("best_val_accuracy")), "best_epoch": _int(status.get("best_epoch")),
        "elapsed_seconds": round(elapsed, 1) if elapsed is not None else None,
        "hourly_usd": settings.hourly_usd, "cost_usd": cost, "sent_at": now.isoformat(timespec="seconds"),
    }
    if event == layout.FAILED:
        fields["error"] = _line(status.get("error") or "no error recorded")
    if recovery is not None:
        fields["recovery"] = recovery
    return {"text": _text(event, fields, recovery), **fields}


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _text(event: str, f: dict[str, Any], recovery: dict[str, Any] | None) -> str:
    """One human line: what happened to which run where, how good it is, how long, what it cost."""
    where = f"orch: run {f['run_id']} {event} on {_line(f['host'], 80)}"
    at = f"epoch {f['epoch'] or 0} of {f['epochs']}" if f["epochs"] else f"epoch {f['epoch'] or 0}"
    best = (f"best val_accuracy {f['best_val_accuracy']:.4f} at epoch {f['best_epoch']}"
            if f["best_val_accuracy"] is not None else "no epoch finished yet")
    spent = [_duration(f["elapsed_seconds"])] if f["elapsed_seconds"] is not None else []
    spent += [f"about ${f['cost_usd']:.2f}"] if f["cost_usd"] is not None else []
    tail = f" ({', '.join(spent)})" if spent else ""
    if event == layout.FINISHED:
        done = f"{f['epoch'] or 0} of {f['epochs']} epochs" if f["epochs"] else f"{f['epoch'] or 0} epochs"
        return f"{where} after {done}: {best}{tail}"
    if event == layout.FAILED:
        return f"{where} at {at}: {f['error']}; {best}{tail}"
    if event == layout.INTERRUPTED:
        return f"{where} by a spot notice at {at}; {best}{tail}; it continues from there once recovered"
    why = _line((recovery or {}).get("why") or (recovery or {}).get("kind") or "", 120)
    return f"{where}{f' ({why})' if why else ''}: continuing from {at}; {best}{tail}"


def test_message(settings: Settings) -> dict[str, Any]:
    host = settings.host or socket.gethostname()
    return {"text": f"orch: test message from {_line(host, 80)}: this webhook gets the runs' "
                    f"{', '.join(settings.on)} notifications", "state": TEST, "host": host,
            "sent_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


# --------------------------------------------------------------------------- a trainer's notifications


def _body(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, ensure_ascii=True).encode()


class RunNotifier:
    """A trainer's notifications: ``recovered`` in the background (training does not wait for
    it), the run's end at :meth:`close` (after the storage mirror's final upload)."""

    def __init__(self, run_dir: Path, settings: Settings | None, log: Log) -> None:
        self.run_dir, self.settings, self.log = run_dir, settings, log
        self._threads: list[threading.Thread] = []

    @classmethod
    def from_environment(cls, run_dir: Path, log: Log) -> RunNotifier:
        path = os.environ.get(SETTINGS_ENV)
        if not path:
            return cls(run_dir, None, log)
        try:
            return cls(run_dir, Settings.parse(read_bytes(Path(path), 1 << 20)), log)
        except (OSError, ValueError) as exc:  # never the run's problem: said once, and no message is sent
            log(f"notify: no notifications for this run ({exc.strerror if isinstance(exc, OSError) else exc})")
            return cls(run_dir, None, log)

    def _send(self, event: str, recovery: dict[str, Any] | None = None) -> None:
        try:
            assert self.settings is not None
            got = post(self.settings.webhook, _body(message(event, self.run_dir, self.settings, recovery)))
            if got.delivered:
                self.log(f"notify: {event} sent to {got.target} (HTTP {got.status})")
            else:
                self.log(f"notify: {event} not delivered to {got.target} after {got.attempts} "
                         f"tr{'y' if got.attempts == 1 else 'ies'} ({got.error}); the run is not affected")
        except Exception as exc:  # a bug here must not become the run's failure
            self.log(f"notify: {event} not sent ({type(exc).__name__}); the run is not affected")

    def wants(self, event: str) -> bool:
        return self.settings is not None and event in self.settings.on

    def recovered(self, recovery: dict[str, Any]) -> None:
        """The run continues after a recovery (its record committed): said in the background."""
        if self.wants(RECOVERED):
            thread = threading.Thread(target=self._send, args=(RECOVERED, recovery), name="notify", daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        """The run's end, if this process wrote it (not a trainer that found the run finished, or
        busy): one message, after any still on its way (each bounded by DEADLINE)."""
        for thread in self._threads:
            thread.join(DEADLINE + TIMEOUT)
        if self.settings is None:
            return
        status = read_json(self.run_dir / layout.STATUS)
        event = status.get("state")
        if status.get("pid") == os.getpid() and event in EVENTS and self.wants(event):
            self._send(event)


@contextlib.contextmanager
def notifying(run_dir: Path, log: Log) -> Iterator[RunNotifier]:
    """Around a whole trainer process: its notifications, the last one when the run has ended."""
    notifier = RunNotifier.from_environment(run_dir, log)
    try:
        yield notifier
    finally:
        notifier.close()


def run(verb: str, args: list[str], out: Any) -> int:
    """``notify test``: the settings on stdin, one test message through the runs' own code."""
    if args != [TEST]:
        raise SystemExit("usage: python3 -m trainer.machine FRAME notify test < SETTINGS")
    try:
        settings = Settings.parse(sys.stdin.buffer.read(1 << 20))
    except ValueError as exc:
        out.answer(Delivery(False, None, 0, str(exc), None))
        return 2
    out.answer(post(settings.webhook, _body(test_message(settings))))
    return 0
