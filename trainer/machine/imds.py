"""The instance metadata service, IMDSv2 only: what the watcher asks a spot instance every few
seconds (is EC2 about to take it back? does it recommend rebalancing?).

Every GET carries a session token from ``PUT /latest/api/token`` (IMDSv1, a GET without a
token, is never sent: no token, no question); a 401 means the token expired: one new token, one
more try. Short timeouts, no proxy (169.254.169.254 is the instance's own link-local address), no
redirects followed, answers read up to a few KB and checked: whatever comes back is untrusted.
Standard library only (urllib).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from trainer.contract.wire import Interruption, WireError

TOKEN_PATH = "/latest/api/token"
INSTANCE_ACTION = "/latest/meta-data/spot/instance-action"
REBALANCE = "/latest/meta-data/events/recommendations/rebalance"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
TTL = 21600  # seconds: the longest EC2 grants
TIMEOUT = 2.0  # seconds per request: the service answers in milliseconds, or not at all
MAX_ANSWER = 4096  # bytes: a notice is ~60, a token ~56
MAX_TOKEN = 512


class ImdsError(Exception):
    """The metadata service did not answer, or not as IMDSv2 does."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirect is an answer we do not follow (the 3xx comes back as an HTTPError)


def _read(answer: Any, limit: int, deadline: float) -> bytes:
    """At most ``limit`` bytes of a body, read before ``deadline`` (a server that sends a byte
    now and then cannot hold the watcher: each read waits at most the timeout)."""
    body = b""
    while len(body) < limit:
        if time.monotonic() > deadline:
            raise ImdsError("the answer came too slowly")
        chunk = answer.read1(limit - len(body)) if hasattr(answer, "read1") else answer.read(limit - len(body))
        if not chunk:
            break
        body += chunk
    return body


class Imds:
    """An IMDSv2 client of one metadata address (``ec2.metadata_url``)."""

    def __init__(self, url: str, timeout: float = TIMEOUT) -> None:
        if not url.startswith(("http://", "https://")):
            raise ImdsError(f"{url[:80]!r} is not an http(s) address")
        self.url, self.timeout = url.rstrip("/"), timeout
        self._token: str | None = None
        self._token_until = 0.0
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())

    def _request(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        """(HTTP status, at most MAX_ANSWER bytes of the body); ImdsError when there is no answer
        or it is too long."""
        request = urllib.request.Request(self.url + path, method=method, headers=headers)
        try:
            with self._opener.open(request, timeout=self.timeout) as answer:
                status, body = answer.status, _read(answer, MAX_ANSWER + 1, time.monotonic() + 2 * self.timeout)
        except urllib.error.HTTPError as exc:
            status, body = exc.code, b""
            exc.close()
        except ImdsError as exc:
            raise ImdsError(f"{method} {path}: {exc}") from None
        except (OSError, ValueError) as exc:  # refused, timed out, a broken answer (http.client's errors)
            raise ImdsError(f"{method} {path}: {getattr(exc, 'reason', None) or exc}") from None
        except Exception as exc:  # http.client.HTTPException: a malformed status line, bad headers
            raise ImdsError(f"{method} {path}: {type(exc).__name__}") from None
        if len(body) > MAX_ANSWER:
            raise ImdsError(f"{method} {path}: an answer over {MAX_ANSWER} bytes")
        return status, body

    def token(self, renew: bool = False) -> str:
        """A session token (kept until shortly before its TTL ends)."""
        if self._token is not None and not renew and time.monotonic() < self._token_until:
            return self._token
        self._token = None
        status, body = self._request("PUT", TOKEN_PATH, {TTL_HEADER: str(TTL)})
        text = body.decode("ascii", "replace").strip()
        if status != 200 or not text or len(text) > MAX_TOKEN or not text.isprintable() or " " in text:
            raise ImdsError(f"PUT {TOKEN_PATH}: no token (HTTP {status})")
        self._token, self._token_until = text, time.monotonic() + TTL - 60
        return text

    def get(self, path: str) -> tuple[int, bytes]:
        """GET ``path`` with a token (a 401: the token expired, one new one and one more try)."""
        status, body = self._request("GET", path, {TOKEN_HEADER: self.token()})
        if status == 401:
            status, body = self._request("GET", path, {TOKEN_HEADER: self.token(renew=True)})
        return status, body

    def _json(self, path: str) -> dict[str, Any] | None:
        """The JSON object at ``path``; None on 404 (nothing there)."""
        status, body = self.get(path)
        if status == 404:
            return None
        if status != 200:
            raise ImdsError(f"GET {path}: HTTP {status}")
        try:
            doc = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ImdsError(f"GET {path}: not JSON") from None
        if not isinstance(doc, dict):
            raise ImdsError(f"GET {path}: not a JSON object")
        return doc

    def instance_action(self) -> Interruption | None:
        """EC2's spot interruption notice (its action and time), or None while there is none."""
        doc = self._json(INSTANCE_ACTION)
        if doc is None:
            return None
        when = doc.get("time")
        try:
            return Interruption(action=doc.get("action"), notice_time=when if isinstance(when, str) else None,
                                noticed_at=time.time())
        except WireError as exc:
            raise ImdsError(f"GET {INSTANCE_ACTION}: {exc}") from None

    def rebalance(self) -> str | None:
        """The time of EC2's rebalance recommendation (noticeTime), or None while there is none."""
        doc = self._json(REBALANCE)
        if doc is None:
            return None
        when = doc.get("noticeTime")
        if not isinstance(when, str) or not when or len(when) > 40 or not when.isascii() or not when.isprintable():
            raise ImdsError(f"GET {REBALANCE}: no noticeTime EC2 would write")
        return when
