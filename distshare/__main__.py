"""`python -m distshare` (and `torchrun -m distshare`, `accelerate launch -m distshare`)."""

import sys

from distshare.cli import main

sys.exit(main())
