"""A Ray Tune sweep over training trials: ``python -m tune.sweep [CONFIG] [key=value ...]``.

The same as ``centernet-ray tune``; the form to use with ``ray job submit --working-dir . --``.
"""

import sys

from centernet_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["tune", *sys.argv[1:]]))
