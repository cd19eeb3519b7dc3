"""`python -m blockpruner.cli COMMAND ...`"""

import sys

from . import main

sys.exit(main())
