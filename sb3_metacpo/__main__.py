"""``python -m sb3_metacpo``: the command line (see :mod:`sb3_metacpo.cli`)."""

import sys

from sb3_metacpo.cli import main

sys.exit(main())
