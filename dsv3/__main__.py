import sys

from dsv3.cli import main

sys.exit(main())
