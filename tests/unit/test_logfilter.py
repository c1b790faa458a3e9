"""The log filter between the trainer and train.log: stamped lines, TensorFlow's known start-up
noise out of train.log (the cuInit failure only where there is no GPU), every byte in the raw log."""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
from pathlib import Path

import trainer
from trainer.contract import layout
from trainer.machine import launch, logfilter
from trainer.ml import mirror

CPU_BOX_OUTPUT = b"""[trainer] 1464 samples, per-frame shape (768,), 36 files skipped (cache: hit)
WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1796122237.440403   18983 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
E0000 00:00:1796122243.290647   18983 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)
I0000 00:00:1796153339.723568     926 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use available CPU instructions in performance-critical operations.
To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow with the appropriate compiler flags.
E0000 00:00:1796122243.290647   18983 some_kernel.cc:12] a real error from TensorFlow
Epoch 1/5
[trainer] finished: best val_accuracy 0.6196 at epoch 4
no newline at the end"""


def filtered(text: bytes, gpu: bool) -> tuple[list[str], bytes]:
    log, raw = io.BytesIO(), io.BytesIO()
    logfilter.filter_stream(io.BytesIO(text), log, raw, logfilter.noise_pattern(gpu))
    return log.getvalue().decode().splitlines(), raw.getvalue()


def test_known_noise_leaves_train_log_and_everything_stays_in_the_raw_log() -> None:
    lines, raw = filtered(CPU_BOX_OUTPUT, gpu=False)
    assert raw == CPU_BOX_OUTPUT
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ "
    assert all(re.match(stamp, line) for line in lines), lines
    assert [line[21:] for line in lines] == [
        "[trainer] 1464 samples, per-frame shape (768,), 36 files skipped (cache: hit)",
        "E0000 00:00:1796122243.290647   18983 some_kernel.cc:12] a real error from TensorFlow",
        "Epoch 1/5", "[trainer] finished: best val_accuracy 0.6196 at epoch 4", "no newline at the end"]


def test_on_a_gpu_box_a_failed_cuinit_is_kept() -> None:
    lines, _ = filtered(CPU_BOX_OUTPUT, gpu=True)
    assert any("failed call to cuInit" in line for line in lines)
    assert any("Could not find cuda drivers" in line for line in lines)
    assert not any("This TensorFlow binary is optimized" in line for line in lines)


def test_an_endless_line_is_cut_not_held() -> None:
    lines, raw = filtered(b"x" * (logfilter.MAX_LINE * 2 + 5) + b"\nend\n", gpu=False)
    assert [len(line) - 21 for line in lines] == [logfilter.MAX_LINE, logfilter.MAX_LINE, 5, 3]
    assert len(raw) == logfilter.MAX_LINE * 2 + 10


class StoredLog:
    """A storage bucket holding one mirrored train.log (what restore's _restore_log reads)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def get_bytes(self, rel: str) -> tuple[bytes, str]:
        return self.data, hashlib.sha256(self.data).hexdigest()


def test_a_restore_rewriting_train_log_while_the_filter_writes_loses_no_line(tmp_path: Path) -> None:
    """The filter appends lines while a restore from storage puts the mirrored log in front of
    them, many times over, at any moment: every line ends up in train.log once, in order."""
    logs = [launch._open_log(tmp_path, name, fresh=True) for name in (layout.TRAIN_LOG, layout.RAW_LOG)]
    filt = launch.start_log_filter(str(Path(trainer.__file__).parent.parent), subprocess.PIPE, *logs)
    for fd in logs:
        os.close(fd)
    lines, restores = 3000, 25
    assert filt.stdin is not None
    batch = lines // restores
    for i in range(lines):
        filt.stdin.write(b"line %d\n" % i)
        if i % batch == batch - 1:
            filt.stdin.flush()
            # the filter is part-way through this batch: the rewrite lands among its writes
            waited_for = f"line {i - batch // 2}\n"
            while waited_for not in (tmp_path / layout.TRAIN_LOG).read_text():
                assert filt.poll() is None
            # a log of its own each time (one already in front is not put there again)
            stored = StoredLog(b"".join(b"stored %d of restore %d\n" % (j, i // batch) for j in range(200)))
            mirror._restore_log(tmp_path / layout.TRAIN_LOG, stored, hashlib.sha256(stored.data).hexdigest())
    filt.stdin.close()
    assert filt.wait(timeout=60) == 0
    got = [line[21:] for line in (tmp_path / layout.TRAIN_LOG).read_text().splitlines()
           if not line.startswith("stored ")]
    assert got == [f"line {i}" for i in range(lines)]
    text = (tmp_path / layout.TRAIN_LOG).read_text()
    assert all(text.count(f"stored 199 of restore {k}\n") == 1 for k in range(restores))


def test_a_restore_started_again_puts_the_stored_log_in_front_once(tmp_path: Path) -> None:
    stored = StoredLog(b"stored 1\nstored 2\n")
    log = tmp_path / layout.TRAIN_LOG
    log.write_bytes(b"this start\n")
    for _ in range(2):  # the first restore was killed before its state.json commit
        mirror._restore_log(log, stored, hashlib.sha256(stored.data).hexdigest())
    assert log.read_bytes() == b"stored 1\nstored 2\nthis start\n"
