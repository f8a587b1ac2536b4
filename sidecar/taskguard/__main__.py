import sys

from taskguard.cli import main

sys.exit(main())
