"""COCO -> sharded Parquet: ``python -m pipelines.ingest --images DIR --annotations JSON --out DIR``."""

import sys

from centernet_ray.cli import main
from centernet_ray.console import plain_output_unless_terminal

if __name__ == "__main__":
    plain_output_unless_terminal()  # as `centernet-ray` does: `ray job logs` get plain text
    raise SystemExit(main(["data", "ingest", *sys.argv[1:]]))
