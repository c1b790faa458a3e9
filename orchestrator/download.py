"""``orch download``: bring a run's best checkpoint and stats back, verified, atomic and
confined to ``DEST/<run_id>/``.

The run argument is checked here and resolved on the machine before any folder is created;
every entry of the run's MANIFEST.sha256 is checked (orchestrator/confine.py) before anything
is written. Each file is streamed into a temporary name beside its destination while its
sha256 is computed (hashed as it lands, never read again), compared with the manifest, and
only then renamed into place; a file already present with the right checksum is not fetched
again. An interrupted download leaves temp files only when orch was killed outright, and the
next download removes them. Over OpenSSH, ONE command on the machine (the ``send`` verb,
trainer/machine/sendfiles.py) holds it busy and answers the whole download on one connection:
the run's list of files, then each file as a sized block.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from orchestrator import children, destination
from orchestrator.confine import Entry, checked_entries
from orchestrator.context import Context
from orchestrator.errors import ConfigError, OrchError, RemoteError
from orchestrator.machine import SILENCE, Machine, check_run_id
from orchestrator.storage import Storage, machine_or_storage
from orchestrator.transfer import FileStream
from trainer.contract import layout, verbs
from trainer.contract.files import is_disk_full, sha256_file
from trainer.contract.wire import DIED, RunFiles, RunInfo, WireError

Progress = Callable[[str, int, int], None]  # (file, bytes done in all, total bytes)
Log = Callable[[str], None]

# A live run may replace its best checkpoint (and then its manifest) while we fetch it: read
# the manifest again and retry, a few times, before calling it a mismatch.
TRIES = 3
RETRY_WAIT = 0.5  # seconds, times the try number


class RunChanging(RemoteError):
    """A live run changed what it lists while it was being downloaded: read it again."""


class ChecksumError(RunChanging):
    """A file did not match the run's manifest (it is not kept)."""


@dataclass
class Downloaded:
    run_id: str
    best_val_accuracy: float | None
    dest: Path
    fetched: list[str] = field(default_factory=list)
    already_there: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "best_val_accuracy": self.best_val_accuracy, "dest": str(self.dest),
                "fetched": self.fetched, "already_there": self.already_there}


def download(ctx: Context, run_id: str | None = None, *, latest: bool = False, dest: Path = Path("artifacts"),
             progress: Progress | None = None) -> Downloaded:
    """Download RUN (its id or a unique prefix; default: the finished run with the best val
    accuracy; ``latest``: the newest run) into ``dest/<run_id>/``."""
    destination.check_dest(dest)
    if run_id is not None:
        check_run_id(run_id)  # before connecting: it becomes a local folder name
    report = progress or (lambda _r, _d, _t: None)

    def from_machine(m: Machine) -> Downloaded:
        with machine_source(m) as source:  # autostop waits for us
            return _Download(source, _resolve(m, source, run_id, latest), dest, report, ctx.log).execute()

    def from_storage(store: Storage) -> Downloaded:
        run = store.choose(run_id, best=not latest)
        files = store.files(run.run_id)
        if files.run is None:
            raise RemoteError(f"run {run.run_id} disappeared from {store.uri}")
        return _Download(store, files, dest, report, ctx.log).execute()

    return machine_or_storage(ctx, from_machine, from_storage)


class Source(Protocol):
    """Where a run is downloaded from: its machine, or the storage mirror."""

    where: str

    def files(self, run_id: str) -> RunFiles: ...

    def fetch(self, run_id: str, rel: str, local: Path, progress: Callable[[int], None] | None = None,
              size: int | None = None) -> str: ...


@dataclass
class MachineSource:
    """The run's machine: the run's files and their list through one stream (transfer.FileStream,
    the ``send`` verb) where OpenSSH is at hand, else one question and one transfer a file."""

    m: Machine
    stream: FileStream | None = None

    @property
    def where(self) -> str:
        return self.m.remote.host

    def files(self, run_id: str) -> RunFiles:
        if self.stream is None:
            return self.m.answer(verbs.FILES, self.m.run_dir(run_id))
        try:
            return RunFiles.from_json(self.stream.record(f"files {run_id}"))
        except WireError as exc:
            raise RemoteError(f"the machine's list of run {run_id}'s files was not understood: {exc}") from exc

    def fetch(self, run_id: str, rel: str, local: Path, progress: Callable[[int], None] | None = None,
              size: int | None = None) -> str:
        if self.stream is not None and size is not None:  # a run always lists its sizes
            return self.stream.fetch(f"{run_id}/{rel}", local, progress, size)
        return self.m.remote.fetch(f"{self.m.run_dir(run_id)}/{rel}", local, progress, size)


@contextlib.contextmanager
def machine_source(m: Machine) -> Iterator[MachineSource]:
    """The machine as a Source, busy for the block (autostop waits): over OpenSSH, ONE command
    (the ``send`` verb) holds it busy and answers the whole download, its connection made while
    orch asks for the list of runs if it needs one; else a hold and one question a step."""
    if not m.remote.bulk_sessions:
        with m.busy():
            yield MachineSource(m)
        return
    with m.bulk_session(verbs.SEND, m.root, SILENCE, what="reading the run's files") as (session, frame):
        yield MachineSource(m, FileStream(session, frame))


def _resolve(m: Machine, source: MachineSource, run_id: str | None, latest: bool) -> RunFiles:
    """The run to download, with its files. A full id costs one question to the machine; a
    prefix, or no id, asks for the list of runs first."""
    if run_id is not None:
        files = source.files(run_id)
        if files.run is not None and files.run.run_id == run_id:
            return files
    run = m.choose(run_id, best=not latest)
    try:  # the machine names the folder: it gets the same check
        check_run_id(run.run_id)
    except ConfigError as exc:
        raise RemoteError(f"the machine lists a run {run.run_id!r} that is not a valid run id; "
                          "it cannot be downloaded") from exc
    files = _files_of(source, run.run_id)
    if files.run is None:
        raise RemoteError(f"run {run.run_id} is gone, or is not a folder of its own on {m.remote.host} (a link?)")
    return files


def _files_of(source: Source, run_id: str) -> RunFiles:
    """The files of run ``run_id`` as the source tells them. The answer names the run, and that
    name becomes the local folder: one that is not the run asked for (``../..``) is refused."""
    files = source.files(run_id)
    if files.run is not None and files.run.run_id != run_id:
        raise RemoteError(f"{source.where} answered for run {files.run.run_id!r} when asked for run {run_id}: "
                          "not downloaded")
    return files


@dataclass
class _Download:
    source: Source
    files: RunFiles  # the latest answer of the machine about the run
    dest: Path
    progress: Progress
    log: Log
    folders: destination.NewFolders = field(default_factory=lambda: destination.NewFolders())

    @property
    def run(self) -> RunInfo:
        assert self.files.run is not None  # _resolve and _reread make sure
        return self.files.run

    @property
    def target(self) -> Path:
        return self.dest / self.run.run_id

    def execute(self) -> Downloaded:
        result = Downloaded(self.run.run_id, self.run.best_val_accuracy, self.target)
        with _sigterm_interrupts(), children.scope(), self.folders.kept_on_success(), self._local_errors():
            destination.remove_stale_parts(self.target)
            for attempt in range(1, TRIES):
                try:
                    return self._once(result)
                except RunChanging:
                    if not self.run.active:
                        raise
                self.log(f"the run is replacing its files while they are fetched; reading its {layout.MANIFEST} "
                         f"again (try {attempt + 1} of {TRIES})")
                time.sleep(RETRY_WAIT * attempt)
                self._reread()
            return self._once(result)

    def _reread(self) -> None:
        files = _files_of(self.source, self.run.run_id)
        if files.run is None:
            raise RemoteError(f"run {self.run.run_id} disappeared from {self.source.where} while it was downloaded")
        self.files = files

    def _once(self, result: Downloaded) -> Downloaded:
        """Check the manifest, fetch what is missing or different."""
        entries = checked_entries(self.run.run_id, self.files, self.target)
        if all(e.rel != layout.BEST_WEIGHTS for e in entries):
            raise self._no_best()
        todo = []
        for e in entries:
            if destination.is_regular_file(e.local) and sha256_file(e.local) == e.sha256:
                if e.rel not in result.fetched and e.rel not in result.already_there:
                    result.already_there.append(e.rel)
            else:
                todo.append(e)
        total = sum(e.size for e in todo)
        destination.check_room(self.dest, total)
        done: dict[str, int] = {}

        def report(rel: str, n: int) -> None:
            done[rel] = n
            self.progress(rel, sum(done.values()), total)

        for e in todo:
            self.folders.make(e.local.parent)
            _fetch(lambda tmp, got, size, rel=e.rel: self.source.fetch(self.run.run_id, rel, tmp, got, size), e,
                   lambda n, r=e.rel: report(r, n), self._mismatch)
            if e.rel in result.already_there:  # changed on the machine since the last try
                result.already_there.remove(e.rel)
            if e.rel not in result.fetched:
                result.fetched.append(e.rel)
        return result

    def _no_best(self) -> OrchError:
        """A live run takes best.weights.h5 out of its manifest while it replaces it."""
        if self.run.active:
            return RunChanging(f"run {self.run.run_id} lists no {layout.BEST_WEIGHTS} in its {layout.MANIFEST} "
                               "(no finished epoch yet, or it is replacing it right now); try again")
        return ConfigError(f"run {self.run.run_id} has no best checkpoint in its {layout.MANIFEST} (no finished "
                           "epoch?); `orch runs` lists the runs")

    def _mismatch(self, e: Entry, got: str) -> ChecksumError:
        what = (f"{e.rel}: checksum mismatch with the run's {layout.MANIFEST} (expected {e.sha256[:12]}..., "
                f"got {got[:12]}...); not saved")
        if self.run.active:
            return ChecksumError(f"{what}. The run replaced it {TRIES} times while it was being fetched: "
                                 "try again, or once the run has finished")
        if self.run.shown_state == DIED:
            return ChecksumError(f"{what}. The run died while writing it: `orch resume {self.run.run_id} "
                                 "--continue` repairs its folder")
        return ChecksumError(f"{what}. The file on the machine was changed or damaged after the run wrote it")

    @contextlib.contextmanager
    def _local_errors(self) -> Iterator[None]:
        """A local file system error is one line: disk full (exit 14) or the destination."""
        try:
            yield
        except OSError as exc:
            if exc.errno in destination.FULL:
                raise destination.disk_full(self.dest) from exc
            where = exc.filename or self.dest
            raise ConfigError(f"cannot write the download to {where}: {exc.strerror or exc}") from exc


def _fetch(fetch: Callable[[Path, Callable[[int], None], int], str], e: Entry, progress: Callable[[int], None],
           mismatch: Callable[[Entry, str], ChecksumError]) -> None:
    """Fetch one file into a temp name beside its place, check it, rename it into place. A
    full disk is raised as the OSError it is (ENOSPC), whichever way the transfer saw it."""
    tmp = destination.part_path(e.local)
    try:
        try:
            got = fetch(tmp, progress, e.size)
        except OrchError as exc:
            if is_disk_full(exc) or destination.short_for_lack_of_room(tmp, e.size):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp)) from exc
            raise
        if destination.short_for_lack_of_room(tmp, e.size):  # OpenSSH exits 0 when it cannot write its output
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
        if got != e.sha256:
            raise mismatch(e, got)
        os.replace(tmp, e.local)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM ends a download like Ctrl-C: its ssh child killed, its temp files removed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
