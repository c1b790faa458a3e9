"""The trainer: data, model, training loop, evaluation, predict (``python -m trainer``).

Import rule: anything the trainer's requirements hold (numpy, Keras on TensorFlow, matplotlib),
``trainer.contract`` and ``trainer.machine``; never ``orchestrator``. TensorFlow/Keras are
imported lazily by the commands that need them, so ``check-data`` and ``synth`` run with numpy
alone. Only the uploaded code runs it, with the training interpreter.
"""
