import sys

from batch_index.cli import main

sys.exit(main())
