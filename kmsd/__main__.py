"""`python -m kmsd` runs the kmsd command (through `kmsd.launch`, before gRPC loads)."""

import sys

from kmsd.launch import main

sys.exit(main())
