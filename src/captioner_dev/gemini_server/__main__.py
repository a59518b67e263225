"""``python -m captioner_dev.gemini_server``: see captioner_dev.gemini_server.cli."""

import sys

from captioner_dev.gemini_server.cli import main

sys.exit(main())
