"""`python -m kmsd` runs the kmsd command."""

import sys

from kmsd.cli import main

sys.exit(main())
