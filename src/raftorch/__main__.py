import sys

from raftorch.cli import main

sys.exit(main())
