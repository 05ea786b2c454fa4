"""``python -m l2c_export.cli`` (torchrun runs ``learn`` this way)."""

import sys

from . import main

sys.exit(main())
