"""``python -m guided_descent`` is the ``guided-descent`` command."""

import sys

from guided_descent.cli.main import main

sys.exit(main())
