"""A stop (SIGTERM) outside fit raises StopRequested wherever the trainer is, also inside
library code that turns every Exception into another (inspect.getfullargspec, which Keras and
TensorFlow call while building a model, makes any of them "TypeError: unsupported callable")."""

from __future__ import annotations

import inspect
import os
import signal

import pytest

from trainer.ml.stopping import Stopper, StopRequested


def test_a_stop_inside_library_code_that_converts_exceptions_is_still_a_stop() -> None:
    class Signature:
        def __call__(self) -> None:
            pass

        @property
        def __signature__(self) -> None:  # inspect asks for it: the signal arrives right here
            os.kill(os.getpid(), signal.SIGTERM)
            return None

    with Stopper(), pytest.raises(StopRequested) as stop:
        inspect.getfullargspec(Signature())
    assert stop.value.signum == signal.SIGTERM
