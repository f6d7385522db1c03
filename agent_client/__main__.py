"""`python -m agent_client run --server URL --state-dir DIR ...`"""

from __future__ import annotations

import sys

from agent_client.cli import main

sys.exit(main())
