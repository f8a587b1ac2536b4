import sys

from taskguard.cli.main import main

sys.exit(main())
