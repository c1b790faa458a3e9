"""A connected training machine and the one way orch runs code there: a verb of
``python3 -m trainer.machine`` (trainer/contract/verbs.py), answered by a framed record of
trainer/contract/wire.py.

The machine side travels with every question, on stdin (a zip of ``trainer.contract`` and
``trainer.machine``, trainer/machine/bootstrap.py unpacks it in memory), so asking never
uploads code and never depends on what is installed there: read-only commands leave the
machine as they found it. Each call has a frame token of its own; whatever else the machine
prints (a login shell's greeting, a warning) is outside the frame and ignored.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import secrets
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache, cached_property
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from orchestrator.errors import ConfigError, ConnectionLost, NoSuchRun, RemoteError
from orchestrator.remote import MAX_LINE, Background, LineFeed, Remote, Result, Streams, Writer, path_word, q
from trainer.contract import layout, verbs
from trainer.contract.codeversion import bootstrap_source, bundle_files
from trainer.contract.verbs import R, Verb
from trainer.contract.wire import Host, RunInfo, Snapshot, WireError

if TYPE_CHECKING:
    from orchestrator.context import Context
    from orchestrator.ec2 import Instance
    from orchestrator.ssh import BulkSession
    from orchestrator.sync import CodeSync

HEADER = 16  # trainer/machine/bootstrap.py: the bundle's size, in decimal, before it
PING, SILENCE = 20.0, 90.0  # the activity hold: a ping this often; gone after this much silence
MAX_NOISE_LINES = 20  # of what the machine printed outside the frame
# A conversing verb (Conversation): the seconds one answer may take (then the connection counts
# as lost: a black-holed network says nothing), and the seconds without a question after which
# the machine's side ends by itself (a connection gone without a word never leaves it behind).
ANSWER_WAIT, IDLE = 120.0, 300.0
MALFORMED = object()  # a conversation's answer line that is not JSON (or was cut at MAX_LINE)
B = TypeVar("B", bound=Background)


def bundle_payload(files: dict[str, bytes]) -> bytes:
    """What precedes a verb's own stdin: the bundle's size, then the bundle (a reproducible zip of ``files``)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, content in sorted(files.items()):
            z.writestr(zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0)), content)
    data = buf.getvalue()
    return f"{len(data):0{HEADER}d}".encode() + data


@cache
def bundle() -> bytes:
    """The payload of this very package's machine side (trainer.contract.codeversion.bundle_files)."""
    return bundle_payload(bundle_files())


@dataclass
class Answer:
    """What a verb said: its record (None: it gave none), its progress lines, and the rest."""

    result: Result
    record: Any = None
    noise: list[str] = field(default_factory=list)  # stdout outside the frame


class _FrameReader:
    """Framed lines of one call (``<frame> <kind> <json>``) out of its stdout, as they arrive."""

    def __init__(self, frame: str, on_progress: Callable[[str], None] | None, every: bool = False) -> None:
        self.mark, self.on_progress = f"{frame} ", on_progress
        self.every = every  # each answer counts, the latest is kept (a conversation), not the first only
        self.answer: Any = None
        self.answered = False
        self.answers = 0  # answer lines counted
        self.noise: list[str] = []

    def _noise(self, text: str) -> None:
        if text.strip() and len(self.noise) < MAX_NOISE_LINES:  # kept for --debug and doctor: a few, cut
            self.noise.append(text[:4096])

    def line(self, line: str) -> None:
        at = line.find(self.mark)
        if at < 0:
            self._noise(line)
            return
        self._noise(line[:at])  # a greeting without its newline, before the frame
        kind, _, payload = line[at + len(self.mark):].partition(" ")
        try:
            value = json.loads(payload)
        except (ValueError, RecursionError):  # not JSON, or nested beyond any record
            if not (self.every and kind == verbs.ANSWER):
                return
            value = MALFORMED  # still the answer to its question: the next one must not wait for it
        if kind == verbs.ANSWER and (self.every or not self.answered):  # else the first answer counts
            self.answer, self.answered = value, True
            self.answers += 1
        elif kind == verbs.PROGRESS and self.on_progress is not None and isinstance(value, str):
            self.on_progress(value)


class BulkAnswers:
    """The framed answers of a verb run through a bulk session (Machine.bulk_session), read off
    its stdout in turn: :meth:`next` while it still runs (it answers more than once), :meth:`last`
    once orch is done with it (its output read to the end, then its exit status)."""

    def __init__(self, m: Machine, session: BulkSession, frame: str) -> None:
        self.m, self.session = m, session
        self.reader = _FrameReader(frame, None, every=True)
        self.feed = LineFeed(self.reader.line)

    def next(self, verb: Verb[R]) -> R:
        """Its next answer, read as ``verb``'s record."""
        want = self.reader.answers + 1
        while self.reader.answers < want:
            chunk = os.read(self.session.stdout, 1 << 16)
            if not chunk:
                return self._end(verb, want)
            self.feed.feed(chunk)
        return self.m._record(verb, self.reader.answer)

    def last(self, verb: Verb[R]) -> R:
        """Its last answer, once its output has ended."""
        want = self.reader.answers + 1
        for chunk in iter(lambda: os.read(self.session.stdout, 1 << 16), b""):
            self.feed.feed(chunk)
        return self._end(verb, want)

    def _end(self, verb: Verb[R], want: int) -> R:
        self.feed.flush()
        code = self.session.finish()
        if self.reader.answers < want:
            raise self.m._failed(verb, self.session.stderr_tail(), f"exit code {code}")
        return self.m._record(verb, self.reader.answer)


class Machine:
    """A connected machine (from orchestrator.provision.acquire) and what commands ask of it."""

    def __init__(self, ctx: Context, remote: Remote, payload: bytes | None = None, *, spot: bool = False) -> None:
        self.ctx, self.cfg, self.remote, self.log = ctx, ctx.cfg, remote, ctx.log
        self.payload = payload if payload is not None else bundle()  # what runs there (tests send broken ones)
        self.launched = False  # a trainer was started by this command (provision keeps the instance running)
        self.instance: Instance | None = None  # the EC2 instance it is (provision sets it)
        self.created = False  # this command created that instance (from ec2.launch)
        self.spot = spot  # EC2 says it is a spot instance: its watcher asks IMDS for interruption notices

    # ---- running a verb -----------------------------------------------------------------

    def _command(self, verb: Verb, args: tuple[str | int | float, ...], frame: str, python: str | None) -> str:
        flags = "" if verb.site else "-I -S "
        return (f"{path_word(python or self.cfg.helper_python)} {flags}-c {q(bootstrap_source())} {frame} "
                f"{q(verb.name)} " + " ".join(q(str(a)) for a in args))

    def ask(self, verb: Verb, *args: str | int, stdin: Writer | None = None, python: str | None = None,
            on_progress: Callable[[str], None] | None = None) -> Answer:
        """Run ``verb`` on the machine from the bundle sent on stdin (then ``stdin``'s bytes)."""
        frame = secrets.token_hex(12)
        reader = _FrameReader(frame, on_progress)

        def write(fh: Any) -> None:
            fh.write(self.payload)
            if stdin is not None:
                stdin(fh)

        result = self.remote.run(self._command(verb, args, frame, python), write=write, check=False,
                                 on_line=reader.line)
        if reader.noise and self.ctx.debug:
            self.log(f"outside the answer to {verb.name}: " + " | ".join(reader.noise[-5:]))
        return Answer(result, reader.answer if reader.answered else None, reader.noise)

    def stream(self, verb: Verb, *args: str | int, sink: Callable[[bytes], None]) -> None:
        """Run a streaming verb; its bytes go to ``sink`` as they arrive (RemoteError if it fails)."""
        assert verb.stream, f"{verb.name} does not stream"
        frame = secrets.token_hex(12)
        self.remote.stream(self._command(verb, args, frame, None), frame, sink, write=lambda fh: fh.write(self.payload),
                           what=f"{verb.name} on the machine")

    @contextlib.contextmanager
    def bulk_session(self, verb: Verb, *args: str | int, what: str | None = None
                     ) -> Iterator[tuple[BulkSession, str]]:
        """``verb`` through OpenSSH for bulk data, its stdin and stdout held open (orchestrator/ssh.py:
        BulkSession), with its frame; the bundle is on its way already, so the connection and the
        interpreter start while the caller does something else. Only where ``remote.bulk_sessions``."""
        frame = secrets.token_hex(12)
        with self.remote.bulk_session(self._command(verb, args, frame, None), first=self.payload,
                                      what=what or f"{verb.name} on the machine") as session:
            yield session, frame

    def bulk_answers(self, session: BulkSession, frame: str) -> BulkAnswers:
        """The answers of a session's verb, in turn (:class:`BulkAnswers`)."""
        return BulkAnswers(self, session, frame)

    def start(self, verb: Verb, *args: str | int | float) -> Background:
        """Run ``verb`` in the background (its output is not read); the bundle is sent, its stdin
        stays open for the caller until the handle is closed."""
        return self._begin(self.remote.start(self._command(verb, args, verbs.NO_FRAME, None)), verb)

    def _begin(self, held: B, verb: Verb) -> B:
        """``held``, the bundle sent to it; RemoteError when its interpreter did not start."""
        try:
            held.write(self.payload)
        except OSError as exc:  # the interpreter did not start (a wrong remote.python, say)
            held.close()
            raise RemoteError(f"{self.cfg.helper_python} could not run {verb.name} on {self.remote.host} "
                              f"({exc.strerror or exc}); check remote.python / remote.env.base_python") from exc
        return held

    def answer(self, verb: Verb[R], *args: str | int, **kwargs: Any) -> R:
        """``verb``'s answer, as the record the contract says it answers with
        (trainer/contract/verbs.py); RemoteError when there is none, or it is not one."""
        assert verb.answer is not None, f"{verb.name} answers nothing"
        got = self.ask(verb, *args, **kwargs)
        if got.record is None:
            raise self._failed(verb, got.result.stderr, f"exit code {got.result.code}")
        return self._record(verb, got.record)

    def _failed(self, verb: Verb, stderr: str, otherwise: str, kind: type[RemoteError] = RemoteError) -> RemoteError:
        """The error of a verb that gave no answer: the last line of its stderr says why."""
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        why = lines[-1] if lines else otherwise
        return kind(f"asking the machine ({verb.name}) failed on {self.remote.host}: {why}")

    def _record(self, verb: Verb[R], record: Any) -> R:
        """``record`` as ``verb``'s answer; RemoteError when it is not one."""
        assert verb.answer is not None, f"{verb.name} answers nothing"
        try:
            if record is MALFORMED:
                raise WireError(f"not JSON, or longer than {MAX_LINE >> 20} MB")
            return verb.answer.from_json(record)
        except WireError as exc:
            raise RemoteError(f"the machine's answer ({verb.name}) was not understood: {exc}") from exc

    # ---- paths on the machine -------------------------------------------------------------

    @cached_property
    def home(self) -> str:
        return self.answer(verbs.HOME).home

    def expand(self, path: str) -> str:
        """``~``, ``~/x`` and relative paths -> absolute: relative to the login's home folder,
        as ssh and scp take them (every command then works whatever folder it runs in)."""
        if path == "~":
            return self.home
        if path.startswith("~/"):
            return f"{self.home.rstrip('/')}/{path[2:]}"
        if not path.startswith("/"):
            return f"{self.home.rstrip('/')}/{path}"
        return path

    def expand_user(self, path: str) -> str:
        """``~`` and ``~/x`` -> absolute; anything else as it is (``python3`` stays a command)."""
        return self.expand(path) if path == "~" or path.startswith("~/") else path

    @cached_property
    def root(self) -> str:
        """remote.root, absolute."""
        return self.expand(self.cfg.remote_root)

    @cached_property
    def data_dir(self) -> str:
        return self.expand(self.cfg.remote_data_dir)

    def run_dir(self, run_id: str) -> str:
        return layout.run_dir(self.root, run_id)

    @cached_property
    def code(self) -> CodeSync:
        """The current code version on the machine, sent (small) the first time it is needed."""
        from orchestrator.sync import sync_code

        return sync_code(self)

    # ---- questions ------------------------------------------------------------------------

    def runs(self) -> list[RunInfo]:
        """Every run, oldest first."""
        runs: list[RunInfo] = self.answer(verbs.RUNS, self.root).runs
        return sorted(runs, key=lambda r: (r.created or 0, r.run_id))

    def host_report(self) -> Host:
        return self.answer(verbs.HOST)

    def snapshot(self, run_id: str, metrics_offset: int = 0, log_lines: int = 10) -> Snapshot:
        """One snapshot, by a command of its own (for snapshots one after another: :meth:`snapshots`)."""
        return self.answer(verbs.SNAPSHOT, self.run_dir(run_id), metrics_offset, log_lines)

    def snapshots(self, run_id: str, idle: float = IDLE) -> Snapshots:
        """The run's snapshots for as long as they are asked for, from ONE command (close it)."""
        return Snapshots(self, run_id, idle)

    def choose(self, run_id: str | None, *, best: bool = False, finished: bool = False) -> RunInfo:
        """The named run (its full id or any unique prefix); else the finished run with the
        highest best val accuracy (``best``); else the latest run."""
        return choose(self.runs(), run_id, self.remote.host, best=best, finished=finished)

    @contextlib.contextmanager
    def busy(self, ping_every: float = PING, silence: float = SILENCE) -> Iterator[None]:
        """Hold the machine's activity lock for the block (trainer/machine/hold.py): the autostop
        watcher never calls the machine idle while orch works there."""
        held = self.start(verbs.HOLD, self.root, silence)
        stop = threading.Event()
        pinger = threading.Thread(target=_pings, args=(held.write, stop, ping_every), daemon=True,
                                  name="orch-activity")
        pinger.start()
        try:
            yield
        finally:
            stop.set()
            held.close()


class Ended(RemoteError):
    """A conversing verb's command ended (it was killed, its idle time passed, it failed)."""


class Conversation(Generic[R]):
    """A verb that converses (``Verb.converses``), left running: each question costs a round
    trip on an open channel, not an interpreter's start and the bundle's trip. Its answers are
    read as one-shot ones are: framed, each line bounded (MAX_LINE), checked as the verb's record."""

    def __init__(self, machine: Machine, verb: Verb[R], *args: str | int | float) -> None:
        assert verb.converses, f"{verb.name} does not converse"
        frame = secrets.token_hex(12)
        self.machine, self.verb = machine, verb
        self.reader = _FrameReader(frame, None, every=True)
        self.lines = LineFeed(self.reader.line)
        self.session = machine._begin(machine.remote.session(machine._command(verb, args, frame, None)), verb)
        self.asked = 0

    def ask(self, question: str, timeout: float = ANSWER_WAIT) -> R:
        """The answer to ``question`` (one line). Ended: the command is gone (the last line of
        its stderr says why); ConnectionLost: the connection is, or no answer came within
        ``timeout`` seconds; RemoteError: an answer that is not the verb's record."""
        try:
            self.session.write(question.encode() + b"\n")
        except OSError:
            raise self._ended() from None
        self.asked += 1
        deadline = time.monotonic() + timeout
        while self.reader.answers < self.asked:
            chunk = self.session.read(max(0.0, deadline - time.monotonic()))
            if chunk is None:
                raise ConnectionLost(f"{self.machine.remote.host} gave no answer ({self.verb.name}) in {timeout:.0f} s")
            if not chunk:
                raise self._ended()
            self.lines.feed(chunk)
        return self.machine._record(self.verb, self.reader.answer)

    def _ended(self) -> RemoteError:
        return self.machine._failed(self.verb, self.session.stderr, "its command ended", Ended)

    def close(self) -> None:
        """EOF on its stdin: the command ends (and is gone when this returns, unless the connection is)."""
        self.session.close()


class Snapshots:
    """One run's snapshots from ONE long-lived command (the ``snapshots`` verb, a
    :class:`Conversation`). A command that ended after it had answered (killed; its idle time
    passed) is started again, once per snapshot; one that ends before its first answer fails the
    call, as a one-shot question does."""

    def __init__(self, machine: Machine, run_id: str, idle: float = IDLE) -> None:
        self.machine, self.run_dir, self.idle = machine, machine.run_dir(run_id), idle
        self.talk: Conversation[Snapshot] | None = None

    def get(self, metrics_offset: int = 0, log_lines: int = 10) -> Snapshot:
        """The run now: metrics lines from ``metrics_offset`` on, the log's last ``log_lines``."""
        while True:
            if self.talk is None:
                self.talk = Conversation(self.machine, verbs.SNAPSHOTS, self.run_dir, self.idle)
            talk = self.talk
            try:
                return talk.ask(f"{metrics_offset} {log_lines}")
            except Ended:
                self.close()
                if not talk.reader.answers:  # it never answered: started again, it would end the same way
                    raise

    def close(self) -> None:
        if self.talk is not None:
            talk, self.talk = self.talk, None
            talk.close()

    def __enter__(self) -> Snapshots:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pings(write: Callable[[bytes], None], stop: threading.Event, every: float) -> None:
    """A byte every ``every`` seconds until ``stop``: the machine side's sign that orch is still there."""
    while not stop.wait(every):
        try:
            write(b".")
        except Exception:  # the connection is gone: so is the verb, with the command
            return


class LiveVerb:
    """A verb that lives as long as the command that runs it (`orch tensorboard`): started at
    once from the bundle, its answer read as soon as it gives it, pinged meanwhile (the machine
    side ends on silence: a laptop that vanished), ended by closing its stdin. Its progress
    lines are kept: what it did at its end. ``on_end`` is called once it has ended, however."""

    def __init__(self, m: Machine, verb: Verb, *args: str | int | float, on_end: Callable[[], None] = lambda: None,
                 ping_every: float = PING) -> None:
        self.verb, self.host = verb, m.remote.host
        self.progress: list[str] = []
        frame = secrets.token_hex(12)
        self.reader = _FrameReader(frame, self.progress.append)
        self.answered, self._stop = threading.Event(), threading.Event()
        self.failure: BaseException | None = None
        self.streams = Streams(LineFeed(self._line).feed)
        self.stdin: queue.Queue[bytes] = queue.Queue()
        self.stdin.put(m.payload)
        self.thread = threading.Thread(target=self._run, args=(m.remote, m._command(verb, args, frame, None), on_end),
                                       daemon=True, name=f"orch-{verb.name}")
        self.pinger = threading.Thread(target=_pings, args=(self.stdin.put, self._stop, ping_every), daemon=True,
                                       name=f"orch-{verb.name}-pings")
        self.thread.start()
        self.pinger.start()

    def _line(self, line: str) -> None:
        self.reader.line(line)
        if self.reader.answered:
            self.answered.set()

    def _run(self, remote: Remote, command: str, on_end: Callable[[], None]) -> None:
        try:
            remote.interact(command, self.stdin.get, self.streams)
        except BaseException as exc:  # kept for the command's own thread, which reports it
            self.failure = exc
        finally:
            self.answered.set()
            on_end()

    def answer(self) -> Any:
        """The verb's answer, as its record (RemoteError, or the connection's error, when none came)."""
        self.answered.wait()
        if not self.reader.answered:
            if self.failure is not None:
                raise self.failure
            lines = [line for line in self.streams.result(0).stderr.splitlines() if line.strip()]
            raise RemoteError(f"{self.verb.name} on {self.host} ended without an answer: "
                              f"{lines[-1] if lines else 'no error message'}")
        try:
            return self.verb.answer.from_json(self.reader.answer)  # type: ignore[union-attr]
        except WireError as exc:
            raise RemoteError(f"the machine's answer ({self.verb.name}) was not understood: {exc}") from exc

    def close(self, wait: float = 60.0) -> list[str]:
        """EOF on the verb's stdin; wait (at most ``wait`` seconds) for it to end; its progress lines."""
        self._stop.set()
        self.pinger.join(wait)
        self.stdin.put(b"")
        self.thread.join(wait)
        return list(self.progress)


def choose(runs: list[RunInfo], run_id: str | None, where: str, *, best: bool = False,
           finished: bool = False) -> RunInfo:
    """Of ``runs`` (oldest first, found ``where``): the named run (its full id or any unique
    prefix); else the finished run with the highest best val accuracy (``best``); else the latest."""
    if run_id is not None:
        return find_run(runs, run_id, where)
    pool = [r for r in runs if r.state == layout.FINISHED] if finished or best else runs
    if best:
        pool = [r for r in pool if r.best_val_accuracy is not None]
        if pool:
            return max(pool, key=lambda r: r.best_val_accuracy or 0.0)
    elif pool:
        return pool[-1]
    kind = "finished run with a best checkpoint" if best or finished else "run"
    raise NoSuchRun(f"no {kind} on {where}; start one with `orch deploy`")


def find_run(runs: list[RunInfo], run_id: str, host: str) -> RunInfo:
    """The run whose id is ``run_id``, else the one it is a unique prefix of."""
    exact = [r for r in runs if r.run_id == run_id]
    if exact:
        return exact[0]
    matches = [r for r in runs if r.run_id.startswith(run_id)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        shown = ", ".join(r.run_id for r in matches[:8]) + (", ..." if len(matches) > 8 else "")
        raise ConfigError(f"run id {run_id!r} is ambiguous on {host}: it starts {len(matches)} runs ({shown}); "
                          "give more of it")
    raise NoSuchRun(f"no run {run_id!r} on {host}; `orch runs` lists them")


def check_run_id(run_id: str) -> str:
    """A run id given by the user: it names a folder on the machine and on this computer."""
    if not layout.is_run_id(run_id):
        raise ConfigError(f"run id {run_id!r}: use letters, digits, '.', '_' and '-' only "
                          "(it names a folder on the machine)")
    return run_id
