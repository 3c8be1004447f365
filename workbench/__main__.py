"""`python -m workbench ...` runs the CLI (also how `accelerate launch -m workbench train ...` starts it)."""
import sys

from workbench.cli import main

sys.exit(main())
