"""Ray Serve: the detection endpoint."""
