"""COCO -> sharded Parquet: ``python -m pipelines.ingest --images DIR --annotations JSON --out DIR``."""

import sys

from centernet_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["data", "ingest", *sys.argv[1:]]))
