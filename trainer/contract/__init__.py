"""The contract: what crosses between orch and the machine, declared once.

Import rule: the standard library and ``trainer.contract`` only (no numpy, no TensorFlow, nothing
of ``trainer.machine`` or ``trainer.ml``, never ``orchestrator``). Both halves import it, and it
travels in the machine bundle, where only the machine's bare ``python3`` runs it.
"""
