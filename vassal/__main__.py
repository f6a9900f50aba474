import sys

from vassal.cli import main

sys.exit(main())
