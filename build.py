#!/usr/bin/env python
"""``python build.py COMMAND ...`` is ``sdxl-pyfunc COMMAND ...``: build, register, promote, copy,
template, batch (``sdxl_tools/cli.py``; ``python build.py --help`` lists them)."""

import sys

from sdxl_tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
