"""`python -m qspp`: the qspp command."""
import sys

from qspp.cli import main

sys.exit(main())
