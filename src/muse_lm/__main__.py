"""`python -m muse_lm ...` is the `muse` command (also what `torchrun -m muse_lm train` runs)."""

from muse_lm.cli import main

raise SystemExit(main())
