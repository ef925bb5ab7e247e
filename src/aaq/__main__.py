"""`python -m aaq`: the `aaq` command line (so that `torchrun ... -m aaq quantize ...` works)."""

import sys

from aaq.cli import main

sys.exit(main())
