"""``python -m beit.export``: the same as ``beit export``."""
import sys

from beit.cli import call
from beit.export.commands import export_main

if __name__ == "__main__":
    sys.exit(call(export_main))
