"""``python -m medquant.cli`` runs the ``medquant`` console command."""
import sys

from . import main

sys.exit(main())
