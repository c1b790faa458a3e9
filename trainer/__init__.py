"""orch's remote half, in three kinds of code with different import rules (tests/unit/test_layers.py
enforces them):

- :mod:`trainer.contract`: what both halves import (the run directory's layout, the trainer's
  options, the wire records, exit codes, the code version, labels in file names). Standard
  library only; imports nothing of ``trainer`` but itself.
- :mod:`trainer.machine`: what orch runs on the machine with its bare ``python3`` (probe, launch,
  environment set-up, preflight, watcher, locks, sync helpers). Standard library and the contract
  only. orch ships it as a bundle (this file, ``contract/`` and ``machine/``) and runs every
  piece of it the one way: ``python3 -m trainer.machine FRAME VERB [ARGS...]``.
- :mod:`trainer.ml`: the trainer itself (numpy, Keras): ``python -m trainer COMMAND``.

This file travels in the bundle: standard library only.
"""

__version__ = "0.1.0"
