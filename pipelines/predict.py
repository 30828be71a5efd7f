"""Batch inference: ``python -m pipelines.predict --checkpoint CKPT --images DIR --output OUT [--annotations JSON]``."""

import sys

from centernet_ray.cli import main
from centernet_ray.console import plain_output_unless_terminal

if __name__ == "__main__":
    plain_output_unless_terminal()  # as `centernet-ray` does: `ray job logs` get plain text
    raise SystemExit(main(["predict", *sys.argv[1:]]))
