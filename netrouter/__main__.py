import sys

from netrouter.cli import main

sys.exit(main())
