import sys

from beit.bench.command import main

sys.exit(main())
