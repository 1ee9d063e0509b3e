"""`python -m neoformer.cli ...` (used by torchrun: `torchrun ... -m neoformer.cli train ...`)."""
import sys

from . import main

sys.exit(main())
