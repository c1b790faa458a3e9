"""The machine side: what orch runs on the training machine with its bare ``python3``.

Import rule: the standard library, ``trainer.contract`` and ``trainer.machine`` only (no numpy,
no TensorFlow, nothing of ``trainer.ml``, never ``orchestrator``). One exception: the preflight
imports the training interpreter's TensorFlow and Keras, inside its check, to see whether they
work. It is what orch ships: the
bundle is this package, the contract and ``trainer/__init__.py`` (the file list is derived from
the packages: ``trainer.contract.codeversion.bundle_files``), and it is run one way only:

    python3 -m trainer.machine FRAME VERB [ARGS...]

from the bundle (sent on stdin, nothing uploaded: ``trainer/machine/bootstrap.py``) or from the
uploaded code. Each verb answers with one framed record of ``trainer.contract.wire``
(``trainer/machine/entry.py``); one that converses (``snapshots``), with one per question.
"""
