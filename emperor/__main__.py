import sys

from emperor.cli import main

sys.exit(main())
