"""``python -m mlperf_tutor`` is the ``mlperf-tutor`` command."""

import sys

from mlperf_tutor.cli import main

sys.exit(main())
