"""``python3 -m trainer.machine FRAME VERB [ARGS...]`` (trainer/machine/entry.py)."""

import sys

from trainer.machine.entry import main

sys.exit(main(sys.argv[1:]))
