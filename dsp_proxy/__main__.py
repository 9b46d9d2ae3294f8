"""`python -m dsp_proxy CONFIG`: the same as the `dsp_proxy` command."""

import sys

from .main import main

sys.exit(main())
