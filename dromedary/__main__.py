"""Entry point for `dromedary`, `python -m dromedary`, `torchrun -m dromedary` and, from a source
checkout, `torchrun dromedary ...` (which runs this folder as a script)."""

import os
import sys

if not __package__:
    # Run as a script (`python dromedary` / `torchrun dromedary`): Python put this folder first on
    # sys.path; put the folder above it there instead so `import dromedary` finds the package.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(here))

from dromedary.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
