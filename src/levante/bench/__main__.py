"""``python -m levante.bench``: run the benchmark suite."""

import sys

from levante.bench.cli import main

sys.exit(main())
