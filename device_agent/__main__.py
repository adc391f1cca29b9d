"""``python -m device_agent`` is ``edgefleet-agent``."""

import sys

from device_agent.cli import main

sys.exit(main())
