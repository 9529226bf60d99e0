import sys

from ligero.cli import main

sys.exit(main())
