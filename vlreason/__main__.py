"""``python -m vlreason`` runs the command line; launchers use it too:
``torchrun --nproc_per_node 8 -m vlreason train CONFIG`` (or ``accelerate launch -m vlreason ...``)."""

import sys

from vlreason.cli import main

sys.exit(main())
