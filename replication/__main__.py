"""``python -m modelreg.replication ARGS``: the replicator, as ``modelreg replicate`` runs it."""

import sys

from modelreg.replication.main import main

sys.exit(main())
