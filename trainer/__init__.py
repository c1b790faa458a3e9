"""The remote half of orch: data discovery, model, training loop, evaluation, predict.

Never imports ``orchestrator``. TensorFlow/Keras are imported lazily by the commands that
need them, so ``python -m trainer check-data`` and ``synth`` run with numpy alone.
"""

__version__ = "0.1.0"
