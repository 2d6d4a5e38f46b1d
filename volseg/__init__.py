"""volseg: 3D volumetric segmentation of CT and MRI.

The Python API, importable from here (each name loads its module on first use, so ``import
volseg`` imports neither torch nor MONAI)::

    import volseg
    cfg = volseg.load_config("demo", ["train.epochs=10"])
    run = volseg.train("data/dataset.json", cfg, "runs/ct")
    pred = volseg.Predictor.from_run(run)
    out = pred.predict([volseg.read_image("scan.nii.gz")])   # out["labels"]: [z, y, x] label values

The package layout is the pipeline, bottom to top (docs/architecture.md): ``config`` and
``data`` / ``nets`` -> ``runtime`` -> ``runfolder`` / ``metrics`` -> ``preprocessing`` /
``postprocessing`` -> ``inference`` / ``planning`` -> ``training`` / ``evaluation`` ->
``workflows`` -> ``cli``.
"""

from importlib import import_module
from typing import Any

from .version import __version__, versions

#: public name -> the module that defines it
_API = {
    "load_config": "volseg.config",
    "Config": "volseg.config",
    "ConfigError": "volseg.config",
    "read_image": "volseg.data.io",
    "read_channels": "volseg.data.io",
    "read_label": "volseg.data.io",
    "write_label_like": "volseg.data.io",
    "ImageReadError": "volseg.data.io",
    "load_manifest": "volseg.data.manifest",
    "ManifestError": "volseg.data.manifest",
    "make_dataset": "volseg.data.synth",
    "PreprocessingPlan": "volseg.data.plan",
    "build_network": "volseg.nets",
    "NETWORKS": "volseg.nets",
    "RunFolderError": "volseg.runfolder",
    "plan_manifest": "volseg.planning",
    "Predictor": "volseg.inference",
    "ModelBundle": "volseg.inference",
    "load_bundle": "volseg.inference",
    "collect_inputs": "volseg.inference",
    "infer_many": "volseg.inference",
    "export": "volseg.inference.export",
    "statistics": "volseg.stats",
    "train": "volseg.training",
    "evaluate": "volseg.evaluation",
    "evaluate_cv": "volseg.evaluation.cv",
    "EvaluationError": "volseg.evaluation",
    "load_results": "volseg.evaluation",
    "format_summary_table": "volseg.evaluation",
    "worst_cases": "volseg.evaluation",
    "write_report": "volseg.evaluation",
    "train_folds": "volseg.workflows",
    "run_demo": "volseg.workflows",
}

__all__ = ["__version__", "versions", "viz", *_API]


def __getattr__(name: str) -> Any:
    if name == "viz":  # figures for notebooks: a module of functions
        value = import_module("volseg.viz")
        globals()[name] = value
        return value
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'volseg' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__():
    return sorted(__all__)
