import sys

# Keras imports scikit-learn, when it is installed, for wrappers the trainer never uses: seconds of
# every trainer start on a box that has it (deep-learning images do). Keras takes it as absent.
sys.modules.setdefault("sklearn", None)  # type: ignore[assignment]

from trainer.ml.cli import main  # noqa: E402 (after the line above, which must come first)

raise SystemExit(main())
