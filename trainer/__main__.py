import contextlib
import ctypes
import os
import sys

# Keras imports scikit-learn, when it is installed, for wrappers the trainer never uses: seconds of
# every trainer start on a box that has it (deep-learning images do). Keras takes it as absent.
sys.modules.setdefault("sklearn", None)  # type: ignore[assignment]

from trainer.ml.cli import main  # noqa: E402 (after the line above, which must come first)

code = main()  # every file it wrote is closed (atomic writes), its output flushed (main's finally)
if "tensorflow" in sys.modules:
    # TensorFlow's native teardown (thread pools, static destructors) takes seconds and does
    # nothing a trainer needs (measured 2.7-4.3 s per start on 2 cores): leave without it, once
    # C's own output buffers (native libraries' lines bound for train.log) are flushed too.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).fflush(None)
    os._exit(code)
raise SystemExit(code)
