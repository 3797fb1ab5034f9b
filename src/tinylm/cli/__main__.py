"""`python -m tinylm.cli` (what torchrun and the tests start)."""

import sys

from tinylm.cli import main

if __name__ == "__main__":  # a spawned child process imports this module too
    sys.exit(main())
