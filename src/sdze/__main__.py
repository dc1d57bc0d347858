import sys

from sdze.cli import main

sys.exit(main())
