import sys

from trainformer.cli import main

sys.exit(main())
