"""Ray Serve: the detection endpoint (request checks, the two deployments, ``build_app``) and
``centernet-ray serve``."""
