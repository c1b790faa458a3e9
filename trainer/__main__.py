from trainer.ml.cli import main

raise SystemExit(main())
