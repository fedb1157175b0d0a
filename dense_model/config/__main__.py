"""``python -m dense_model.config ...``: the launcher's check (``python -m dense_model.launcher``), kept
under its old name. An entry point: nothing imports it, so it may sit above the config package."""

import sys

from dense_model.launcher import main

sys.exit(main())
