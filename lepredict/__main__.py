"""`python -m lepredict` runs the command line (the same as the `lepredict` script)."""
import sys

from lepredict.cli import main

sys.exit(main())
