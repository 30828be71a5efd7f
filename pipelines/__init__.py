"""Ray Data job entry points, for `ray job submit --working-dir . -- python -m pipelines.<name> ...`.

Each is the matching `centernet-ray` sub-command; the logic lives in the centernet_ray package.
"""
