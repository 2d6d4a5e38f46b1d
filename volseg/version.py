"""The package version and the versions of the libraries that decide results."""

__version__ = "0.1.0"


def versions() -> dict:
    """Versions of volseg and the libraries that decide its results (recorded in run folders
    and inference sidecars). Imports torch/monai, so call it only when they are needed."""
    import platform

    import monai
    import numpy
    import SimpleITK
    import torch

    return {
        "volseg": __version__,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "SimpleITK": SimpleITK.Version_VersionString(),
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }
