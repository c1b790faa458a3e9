"""Run notifications (deploy.yaml ``notify:``), what both halves agree on: the events, what a
webhook URL may be, how one is shown, and the settings orch hands the machine. Standard
library only.

A webhook URL is a credential (Slack's carries its secret in the path): it is never written
where run folders, logs or command output would carry it. orch sends the settings to the
machine on stdin; the launcher keeps them in ``<remote_root>/notify/<run_id>.json`` (0600,
its folder 0700) and tells the trainer where (:data:`SETTINGS_ENV`); wherever a URL is shown,
it is :func:`redact`-ed to its scheme and host.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from urllib.parse import urlsplit

from trainer.contract import layout

RECOVERED = "recovered"  # a continued trainer starts with a recorded recovery
EVENTS = (layout.FINISHED, layout.FAILED, layout.INTERRUPTED, RECOVERED)
TEST = "test"  # `orch notify test`: not an event a run has
SETTINGS_ENV = "ORCH_NOTIFY_FILE"  # the launcher tells the trainer where its settings are
MAX_URL = 2048
MAX_SETTINGS = 16 << 10  # bytes of a settings file: far above what one holds


def check_webhook(url: str) -> str:
    """``url`` if it is an http(s) URL with a host and no credentials, spaces or control
    characters; ValueError says what is wrong (never repeating the URL: it may be a secret)."""
    if not isinstance(url, str) or not url:
        raise ValueError("give the webhook's http(s) URL")
    if len(url) > MAX_URL or not url.isascii() or not url.isprintable() or " " in url:
        raise ValueError(f"a webhook URL is at most {MAX_URL} printable ASCII characters without spaces")
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError for a port that is not one
    except ValueError:
        raise ValueError("not a URL (check its host and port)") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if "@" in parts.netloc:
        raise ValueError("credentials (user:password@) do not belong in the URL")
    del port
    return url


def redact(url: str) -> str:
    """The URL as it may be shown: scheme and host (and port), the rest (the secret) left out."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(a webhook URL)"
    host = f"[{host}]" if ":" in host else host
    rest = "/..." if parts.path.strip("/") or parts.query else ""
    return f"{parts.scheme}://{host}{port}{rest}"


@dataclass(frozen=True)
class Settings:
    """What the machine needs to notify: the URL, the events, and the instance's price."""

    webhook: str
    on: tuple[str, ...] = EVENTS
    hourly_usd: float | None = None  # the instance's price per hour, when orch knows it
    host: str | None = None  # the name orch knows the machine by (EC2 instance id, ssh host)

    def to_bytes(self) -> bytes:
        return json.dumps({"webhook": self.webhook, "on": list(self.on), "hourly_usd": self.hourly_usd,
                           "host": self.host}).encode()

    @classmethod
    def parse(cls, data: bytes) -> Settings:
        """Settings from their file (or stdin): ValueError when they are not (the URL not repeated)."""
        if len(data) > MAX_SETTINGS:
            raise ValueError("notify settings: too big")
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):
            raise ValueError("notify settings: not JSON") from None
        if not isinstance(doc, dict):
            raise ValueError("notify settings: not a JSON object")
        on = doc.get("on", list(EVENTS))
        if not isinstance(on, list) or not all(isinstance(e, str) and e in EVENTS for e in on):
            raise ValueError(f"notify settings: on must list some of {', '.join(EVENTS)}")
        price = doc.get("hourly_usd")
        ok_price = isinstance(price, (int, float)) and not isinstance(price, bool) and math.isfinite(price) \
            and 0 <= price < 1e6
        host = doc.get("host")
        ok_host = isinstance(host, str) and 0 < len(host) <= 255 and host.isprintable()
        return cls(check_webhook(doc.get("webhook")), tuple(dict.fromkeys(on)), float(price) if ok_price else None,
                   host if ok_host else None)

