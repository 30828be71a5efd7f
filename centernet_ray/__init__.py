"""centernet-ray: train, tune and serve CenterNet ("Objects as Points") detectors on Ray.

The core modules (config, targets, losses, model, decode, data, evaluation, drawing) never import
Ray, so they run and test on any machine with torch alone.
"""

__version__ = "0.1.0"


def versions() -> str:
    """This package's version and those of the stack it runs on, for ``centernet-ray --version``
    and bug reports (read from the installed packages' metadata: nothing is imported)."""
    import platform
    from importlib import metadata

    def installed(name: str) -> str:
        try:
            return f"{name} {metadata.version(name)}"
        except metadata.PackageNotFoundError:
            return f"{name} not installed"

    stack = ", ".join(installed(name) for name in ("torch", "torchvision", "ray", "mlflow", "pyarrow"))
    return f"centernet-ray {__version__} (Python {platform.python_version()}; {stack})"
