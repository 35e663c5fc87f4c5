"""``python -m medvol ...`` is the ``medvol`` command."""

import sys

from medvol.apps.cli import main

sys.exit(main())
