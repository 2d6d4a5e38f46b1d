"""volseg: 3D volumetric segmentation of CT and MRI.

The package layout follows the pipeline: ``volseg.data`` (manifests, I/O, preprocessing,
synthetic phantoms) -> ``volseg.nets`` (one builder, one registry) -> ``volseg.training``
(ignite engine) -> ``volseg.inference`` (predictor, export) -> ``volseg.evaluation``
(metrics, reports) -> ``volseg.viz``. Importing ``volseg`` imports no torch.
"""

__version__ = "0.1.0"
