"""Warnings that third-party packages print at import time and that say nothing about this
library, silenced before those packages are imported (``cl_sulora/__init__`` imports this
module first)."""

import warnings

# Avalanche imports qpsolvers (for its GEM plugin, which this library does not use), which warns
# where no QP solver is installed: on every command, ``--help`` included.
warnings.filterwarnings("ignore", message="no QP solver found", category=UserWarning)
