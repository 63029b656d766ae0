import sys

from lvmtrain.cli import main

sys.exit(main())
