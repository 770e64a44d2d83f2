"""``python -m gpt1_ds VERB ...``: the ``gpt1-ds`` command (``gpt1_ds.cli``)."""

import sys

from gpt1_ds.cli import main

sys.exit(main())
