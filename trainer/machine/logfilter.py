"""The trainer's output on its way to train.log (verb ``log-filter``, started by a launch beside
the trainer, reading the trainer's stdout and stderr on its stdin):

    log-filter RAW_LOG_FD      stdin -> stdout (train.log) and fd RAW_LOG_FD (train.raw.log)

Every line of train.log starts with the time it arrived (UTC, to the second); the known noise of
TensorFlow's C++ start-up (``E0000 ... failed call to cuInit`` on a box without a GPU reads as an
error and is none) is left out of it. train.raw.log keeps every byte as it came, so nothing is
lost. A line is written as soon as it is complete (the monitor's log tail is live); one longer
than MAX_LINE is cut there. The filter ends when its stdin closes (the trainer has exited) and
ignores the signals that stop a trainer: the trainer's last words still reach the log.
Standard library only.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import BinaryIO

from trainer.contract.files import writing_alone

MAX_LINE = 64 << 10
# glog's prefix: severity, MMDD, time (absl writes HH:MM:<epoch seconds>), thread id, then file:line]
_GLOG = rb"[IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ "
# Harmless on every box: start-up chatter of TensorFlow, XLA and absl.
_ALWAYS = [
    rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    _GLOG + rb"cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized",
    rb"To enable the following instructions: .*rebuild TensorFlow with the appropriate compiler flags\.",
    _GLOG + rb"port\.cc:\d+\] oneDNN custom operations are on",
    _GLOG + rb"cuda_(?:fft|dnn|blas)\.cc:\d+\] Unable to register cu\w+ factory",
    _GLOG + rb"computation_placer\.cc:\d+\] computation placer already registered",
    rb"TF-TRT Warning: Could not find TensorRT",
]
# Noise only where there is no GPU: on a GPU box a failed cuInit is the real error.
_WITHOUT_GPU = [
    _GLOG + rb"cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine",
    _GLOG + rb"cuda_(?:platform|executor)\.cc:\d+\] failed call to cuInit",
    _GLOG + rb"cuda_diagnostics\.cc:\d+\] ",
    _GLOG + rb"gpu_device\.cc:\d+\] (?:Cannot dlopen some GPU libraries|Skipping registering GPU devices)",
]


def has_gpu() -> bool:
    """Whether this box has an NVIDIA GPU (its driver's device node, or nvidia-smi)."""
    return os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi") is not None


def noise_pattern(gpu: bool) -> re.Pattern[bytes]:
    """The lines left out of train.log (matched at the start of a line)."""
    return re.compile(b"|".join(b"(?:" + p + b")" for p in _ALWAYS + ([] if gpu else _WITHOUT_GPU)))


def stamp(when: float) -> bytes:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ ", time.gmtime(when)).encode()


def filter_stream(source: BinaryIO, log: BinaryIO, raw: BinaryIO, noise: re.Pattern[bytes],
                  alone: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext) -> None:
    """Copy ``source`` to ``raw`` as is and to ``log`` line by line, stamped, without ``noise``;
    each line of ``log`` written inside ``alone()`` (its lock)."""
    while line := source.readline(MAX_LINE):
        _write(raw, line)
        if not noise.match(line):
            with alone():
                _write(log, stamp(time.time()) + (line if line.endswith(b"\n") else line + b"\n"))


def _write(out: BinaryIO, data: bytes) -> None:
    """A line, or nothing when it cannot be written (a full disk): the filter reads on, so the
    trainer's writes never block or break on a pipe nobody empties, and later lines get in
    once there is space again."""
    try:
        out.write(data)
        out.flush()
    except OSError:
        pass


def run(verb: str, args: list[str], out: object) -> int:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    with os.fdopen(int(args[0]), "ab", buffering=0) as raw, os.fdopen(sys.stdout.fileno(), "ab", buffering=0,
                                                                       closefd=False) as log:
        # train.log is locked per line: a restore from storage rewrites it whole (trainer/ml/mirror.py)
        filter_stream(sys.stdin.buffer, log, raw, noise_pattern(has_gpu()), lambda: writing_alone(log.fileno()))
    return 0
