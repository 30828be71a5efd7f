"""A Ray Tune sweep over training trials: ``python -m tune.sweep [CONFIG] [key=value ...]``.

The same as ``centernet-ray tune``; the form to use with ``ray job submit --working-dir . --``.
"""

import sys

from centernet_ray.cli import main
from centernet_ray.console import plain_output_unless_terminal

if __name__ == "__main__":
    plain_output_unless_terminal()  # as `centernet-ray` does: `ray job logs` get plain text
    raise SystemExit(main(["tune", *sys.argv[1:]]))
