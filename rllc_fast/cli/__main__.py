"""``python -m rllc_fast.cli ...``: the ``rllc`` command."""
import sys

from . import main

sys.exit(main())
