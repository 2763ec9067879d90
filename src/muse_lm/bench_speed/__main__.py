"""`python -m muse_lm.bench_speed --readme README.md`: the README tables from the JSON results."""

import sys

from muse_lm.bench_speed import main

sys.exit(main())
