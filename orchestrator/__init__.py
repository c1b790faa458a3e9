"""The local half of orch: config, EC2, SSH, sync, deploy, monitor, download.

Never imports TensorFlow. boto3 and paramiko are imported lazily inside the functions that
need them, so ``orch --help`` starts fast.
"""

__version__ = "0.1.0"
