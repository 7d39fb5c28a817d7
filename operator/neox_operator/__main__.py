"""`python -m neox_operator` is `neox-operator`."""

import sys

from .cli import main

sys.exit(main())
