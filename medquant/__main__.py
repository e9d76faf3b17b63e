"""``python -m medquant`` runs the ``medquant`` console command (as ``python -m medquant.cli``)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
