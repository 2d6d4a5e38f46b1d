"""volseg: 3D volumetric segmentation of CT and MRI.

The package layout follows the pipeline: ``volseg.data`` (manifests, I/O, preprocessing,
synthetic phantoms) -> ``volseg.nets`` (one builder, one registry) -> ``volseg.training``
(ignite engine) -> ``volseg.inference`` (predictor, export) -> ``volseg.evaluation``
(metrics, reports) -> ``volseg.viz``. Importing ``volseg`` imports no torch.
"""

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
