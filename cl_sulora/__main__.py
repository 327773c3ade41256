"""``python -m cl_sulora``: the ``cl-sulora`` command line (``torchrun ... -m cl_sulora run``)."""

from .runner.cli import main

raise SystemExit(main())
