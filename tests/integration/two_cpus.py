"""`python -m trainer` on a CPU split into two logical devices (what a box with two GPUs is to
the trainer: MirroredStrategy with two replicas), the split made before TensorFlow is used:

    python -m tests.integration.two_cpus train --data-dir ... --run-dir ...
"""

from __future__ import annotations

import runpy
import sys

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.argv = ["trainer", *sys.argv[1:]]
runpy.run_module("trainer", run_name="__main__")
