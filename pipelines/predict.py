"""Batch inference: ``python -m pipelines.predict --checkpoint CKPT --images DIR --output OUT [--annotations JSON]``."""

import sys

from centernet_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["predict", *sys.argv[1:]]))
