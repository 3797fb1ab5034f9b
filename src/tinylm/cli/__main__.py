"""`python -m tinylm.cli` (what torchrun and the tests start)."""

import sys

from tinylm.cli import main

sys.exit(main())
