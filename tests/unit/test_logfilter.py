"""The log filter between the trainer and train.log: stamped lines, TensorFlow's known start-up
noise out of train.log (the cuInit failure only where there is no GPU), every byte in the raw log."""

from __future__ import annotations

import io
import re

from trainer.machine import logfilter

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
