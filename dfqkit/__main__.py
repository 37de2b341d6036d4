"""``python -m dfqkit COMMAND ...``: the ``dfqkit`` command (:mod:`dfqkit.cli`)."""

import sys

from dfqkit.cli import main

sys.exit(main())
