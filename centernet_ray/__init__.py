"""centernet-ray: train, tune and serve CenterNet ("Objects as Points") detectors on Ray.

The core modules (config, targets, losses, model, decode, data, evaluation, drawing) never import
Ray, so they run and test on any machine with torch alone.
"""

__version__ = "0.1.0"
