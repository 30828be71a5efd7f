"""``python -m centernet_ray ...`` is the same as the ``centernet-ray`` command."""

from centernet_ray.cli import main

raise SystemExit(main())
