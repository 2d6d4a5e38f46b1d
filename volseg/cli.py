"""``volseg`` command line: a thin shell over the Python API.

Heavy modules (torch, monai, SimpleITK) are imported inside the commands so ``volseg --help``
answers at once. Library code logs; this module talks to people (progress bars, tables) and turns
user mistakes into one-line errors with exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

log = logging.getLogger("volseg")


def _config(args) -> object:
    from .config import load_config

    return load_config(args.config, args.set or [])


def _set_keys(sets: Sequence[str]) -> List[str]:
    """The ``section.key`` names of ``--set`` values, parsed as the config parses them."""
    from .config import apply_overrides

    return [f"{section}.{key}" for section, values in apply_overrides({}, sets).items() for key in values]


def _infer_overrides(args) -> dict:
    """``volseg infer``'s settings: ``--set infer.KEY=VALUE`` (and the shortcut flags), checked
    against the typed ``infer`` section (unknown keys and bad values end in one line)."""
    from .config import ConfigError, apply_overrides, from_dict

    sets = list(args.set or [])
    if args.overlap is not None:
        sets.append(f"infer.overlap={args.overlap}")
    if args.batch_size is not None:
        sets.append(f"infer.batch_size={args.batch_size}")
    if args.tta and args.no_tta:
        raise ConfigError("--tta and --no-tta contradict each other; give one.")
    if args.tta:
        sets.append("infer.tta=true")
    if args.no_tta:
        sets.append("infer.tta=false")
    other = [k for k in _set_keys(sets) if not k.startswith("infer.")]
    if other:
        raise ConfigError(f"volseg infer --set takes infer.KEY=VALUE only; {other} belong to training (volseg train --set).")
    values = apply_overrides({}, sets).get("infer", {})
    from_dict({"infer": values})  # the typed check: names the allowed keys and ranges
    return values


def _add_config_args(p: argparse.ArgumentParser, default: Optional[str] = None, without: str = "") -> None:
    p.add_argument("--config", default=default, metavar="FILE_OR_NAME",
                   help=f"YAML config file, or the name of a shipped config such as gpu_fullres or demo (default: {without or '%(default)s'})")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config key, repeatable (e.g. --set train.epochs=10)")


def _progress(args) -> bool:
    """Progress bars only on a terminal: in a log file or a pipe every redraw would append a
    carriage-return frame. Without bars, the INFO log lines (one per epoch, one per scan) still
    say how far a command got, one line each."""
    return not args.quiet and sys.stderr.isatty()


def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the network runs (default: auto = cuda if available)")


# ------------------------------------------------------------------------------------------------
# commands


def cmd_model(args) -> int:
    cfg = _config(args)  # before importing torch: a mistyped --config fails at once
    from .nets import summarize

    print(summarize(cfg.model))
    return 0


def cmd_synth(args) -> int:
    from .data.synth import make_dataset, make_tumor_dataset

    if args.task == "tumor":
        path = make_tumor_dataset(args.out_dir, cases=args.cases, seed=args.seed, shape=tuple(args.shape or (40, 40, 32)),
                                  test_cases=args.test_cases, sparse=args.sparse, overwrite=args.force)
        sparse = f", training labels on every {args.sparse}th slice" if args.sparse > 1 else ""
        print(f"wrote {args.cases} training + {args.test_cases} test tumour phantoms (region labels{sparse}): {path}")
        return 0
    if args.sparse != 1:
        from .config import ConfigError

        raise ConfigError(f"--sparse {args.sparse} needs --task tumor (the abdomen phantoms are fully annotated).")
    path = make_dataset(
        args.out_dir, cases=args.cases, modality=args.modality, seed=args.seed,
        shape=tuple(args.shape or (64, 64, 48)), spacing=tuple(args.spacing) if args.spacing else None, test_cases=args.test_cases,
        overwrite=args.force,
    )
    print(f"wrote {args.cases} training + {args.test_cases} test {args.modality.upper()} phantoms: {path}")
    return 0


def cmd_plan(args) -> int:
    from .data.manifest import load_manifest
    from .planning import plan_manifest
    from .runtime import resolve_device

    out = Path(args.output)
    plan_manifest(load_manifest(args.manifest), out, memory_gb=args.memory, device=resolve_device(args.device).type)
    print(f"planned config: {out}\nfingerprint:    {out.with_name(out.stem + '.fingerprint.json')}")
    print(f"train with:     volseg train {args.manifest} --config {out}")
    return 0


def cmd_train(args) -> int:
    from .training import train

    # --resume replays the run's stored config; only train.epochs may change (to extend it).
    # Without --config a new run is planned from the data; --set then overrides planned keys.
    cfg = _config(args) if (args.config or args.set or not args.resume) else None
    planned = not args.config and not args.resume
    keep = ("train.epochs", "data.fold") if args.folds else ("train.epochs",)
    if args.resume and cfg is not None and (args.config or any(k not in keep for k in _set_keys(args.set or []))):
        from .config import ConfigError

        raise ConfigError("--resume continues a run with its stored config; only --set train.epochs=N may be given (to extend it).")
    out = args.output or str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    if args.folds:
        return _train_folds(args, None if planned else cfg, out, planned)
    from . import distributed

    try:  # under torchrun every process runs this; train() joins the process group
        run = train(args.manifest, None if planned else cfg, out, resume=args.resume, device=args.device, progress=_progress(args),
                    overrides=(args.set or []) if planned else (), pretrained=args.pretrained)
    finally:
        distributed.shutdown()
    if distributed.is_main():
        print(f"run folder: {run}")
    return 0


def _train_folds(args, cfg, out: str, planned: bool) -> int:
    """``--folds K``: every fold, or only fold k with ``--set data.fold=k``."""
    from .config import apply_overrides
    from .workflows import train_folds

    fold = apply_overrides({}, args.set or []).get("data", {}).get("fold")
    if args.resume:  # the parent's stored config
        if any(k != "data.fold" for k in _set_keys(args.set or [])):
            from .config import ConfigError

            raise ConfigError(f"--folds --resume continues the folds with {out}/config.yaml; to extend one fold, resume its own "
                              f"folder: volseg train MANIFEST --output {out}/fold_K --resume --set train.epochs=N.")
        cfg, planned = None, False
    parent = train_folds(args.manifest, cfg, out, args.folds, only=None if fold is None else int(fold), resume=args.resume,
                         device=args.device, progress=_progress(args), overrides=(args.set or []) if planned else (),
                         pretrained=args.pretrained)
    print(f"cross-validation folder: {parent}")
    return 0


def cmd_infer(args) -> int:
    from . import distributed
    from .inference import collect_inputs, infer_many
    from .inference.batch import jobs_for_model, summary_path
    from .inference.inputs import parse_formats

    overrides = _infer_overrides(args)
    formats = parse_formats(args.format)
    model = args.model[0] if len(args.model) == 1 else args.model
    jobs = jobs_for_model(collect_inputs(args.inputs, args.output), model)
    folds = [f.strip() for f in args.folds.split(",") if f.strip()] if args.folds else None
    failures = infer_many(jobs, model, device=args.device, overrides=overrides, probabilities=args.probabilities, progress=_progress(args),
                          formats=formats, statistics=args.statistics, checkpoint=args.checkpoint, folds=folds)
    if not distributed.is_main():
        # rank 0 reports every rank's scans and sets the exit status: torchrun stops all ranks
        # as soon as one exits non-zero, which would cut rank 0 off while it merges the summary
        return 0
    print(f"{len(jobs) - len(failures)}/{len(jobs)} scan(s) segmented; summary: {summary_path(jobs)}")
    for job, err in failures:
        print(f"FAILED {job.name}: {err}", file=sys.stderr)
    return 1 if failures else 0


def cmd_evaluate(args) -> int:
    from .evaluation import EvaluationError, evaluate, format_summary_table

    if args.cv:
        from .evaluation.cv import evaluate_cv

        if args.pred or args.truth:
            raise EvaluationError("--cv FOLDER evaluates the folder's own validation predictions; give it without --pred/--truth.")
        print(format_summary_table(evaluate_cv(args.cv, args.output, args.tolerance)))
        if args.output:
            print(f"metrics written to {args.output}")
        return 0
    if not (args.pred and args.truth):
        raise EvaluationError("give --pred and --truth (or --cv RUN_OR_CV_FOLDER).")
    result = evaluate(args.pred, args.truth, labels=args.labels, output=args.output, tolerance_mm=args.tolerance,
                      images=args.images, allow_missing=args.allow_missing)
    print(format_summary_table(result))
    if args.output:
        print(f"metrics written to {args.output}")
    return 0


def cmd_report(args) -> int:
    from .evaluation import write_report

    path = write_report(args.run_dir, eval_dir=args.eval_dir, output=args.output, viewer=not args.no_viewer, cases=args.cases)
    print(f"report: {path}")
    return 0


def cmd_view(args) -> int:
    from .viz import write_viewer

    labels = None
    if args.labels:  # a manifest, or a run folder (its dataset.json holds the labels training saw)
        from .data.manifest import load_manifest

        src = Path(args.labels)
        labels = dict(load_manifest(src / "dataset.json" if src.is_dir() else src).labels)
    scan = Path(args.scan)
    out = args.output or scan.parent / f"{scan.name.split('.')[0]}_view.html"
    path = write_viewer(out, scan, args.mask, args.truth, labels=labels, name=scan.name)
    print(f"viewer: {path}")
    if args.open:
        import webbrowser

        webbrowser.open(Path(path).resolve().as_uri())
    return 0


def cmd_export(args) -> int:
    from .inference.export import export

    path = export(args.run_dir, args.format, args.output, fold=args.fold)
    print(f"exported {args.format}: {path}")
    return 0


def cmd_demo(args) -> int:
    from .workflows import run_demo

    summary = run_demo(args.output, device=args.device, overrides=args.set or [], progress=_progress(args),
                       cases=args.cases, test_cases=args.test_cases, shape=tuple(args.shape))
    resumed = f" ({summary['minutes_this_call']:.1f} min in this call, which continued an earlier run)" if summary["resumed"] else ""
    print(f"\nvolseg demo finished in {summary['minutes']:.1f} min{resumed}")
    print(f"  mean foreground Dice on held-out phantoms: {summary['dice']:.3f}")
    for k in ("data", "run", "predictions", "evaluation", "report"):
        print(f"  {k:12s} {summary[k]}")
    return 0


# ------------------------------------------------------------------------------------------------

#: one example per subcommand, shown by ``volseg COMMAND --help``
EXAMPLES = {
    "demo": "volseg demo --output demo",
    "model": "volseg model --config gpu_fullres --set model.variant=residual",
    "synth": "volseg synth data/ --cases 8 --modality ct",
    "plan": "volseg plan data/dataset.json --output ct.yaml --memory 8",
    "train": "volseg train data/dataset.json --config ct.yaml --output runs/ct --set train.epochs=100",
    "infer": "volseg infer scans/ --model runs/ct --output preds/ --set infer.overlap=0.25 --set infer.tta=true",
    "evaluate": "volseg evaluate --pred preds/ --truth data/dataset.json --output runs/ct/eval",
    "report": "volseg report runs/ct --eval-dir runs/ct/eval",
    "export": "volseg export runs/ct --format onnx",
    "view": "volseg view scans/ct_001.nii.gz --mask preds/ct_001_seg.nii.gz --truth labels/ct_001.nii.gz --open",
}


def _command(sub, name: str, help: str) -> argparse.ArgumentParser:  # noqa: A002 - argparse's own keyword
    return sub.add_parser(name, help=help, description=help, epilog=f"example:\n  {EXAMPLES[name]}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    p = argparse.ArgumentParser(prog="volseg", description="3D volumetric segmentation of CT and MRI.")
    p.add_argument("--version", action="version", version=f"volseg {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only (bars are shown only when stderr is a terminal)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = _command(sub, "demo", help="generate phantoms, train, infer, evaluate and report (the README's first command)")
    s.add_argument("--output", default="demo", help="folder for everything the demo writes (default: %(default)s)")
    s.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a key of the shipped demo config (configs/demo.yaml)")
    s.add_argument("--cases", type=int, default=10, help="training phantoms (default: %(default)s)")
    s.add_argument("--test-cases", type=int, default=4, help="held-out phantoms (default: %(default)s)")
    s.add_argument("--shape", type=int, nargs=3, default=[64, 64, 48], metavar=("X", "Y", "Z"), help="approximate phantom grid")
    _device_arg(s)
    s.set_defaults(func=cmd_demo)

    s = _command(sub, "model", help="print a network summary (levels, receptive field, parameters)")
    _add_config_args(s)
    s.set_defaults(func=cmd_model)

    s = _command(sub, "synth", help="write synthetic CT/MRI phantoms and a Decathlon dataset.json")
    s.add_argument("out_dir")
    s.add_argument("--cases", type=int, default=8, help="training cases (default: %(default)s)")
    s.add_argument("--test-cases", type=int, default=2, help="held-out test cases (default: %(default)s)")
    s.add_argument("--modality", choices=["ct", "mr", "mri"], default="ct", help="ct: int16 HU; mr (= mri): float intensities (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"), help="default: 64 64 48 (abdomen), 40 40 32 (tumor)")
    s.add_argument("--task", choices=["abdomen", "tumor"], default="abdomen",
                   help="abdomen: liver, kidneys, lesion; tumor: nested tumour parts with nnU-Net region labels (default: %(default)s)")
    s.add_argument("--sparse", type=int, default=1, metavar="K",
                   help="tumor: keep every K-th z slice of the training labels annotated, the rest 'ignore' (default: %(default)s, all)")
    s.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"), help="mm; default varies per case")
    s.add_argument("--force", action="store_true", help="replace the dataset OUT_DIR already holds (refused without it)")
    s.set_defaults(func=cmd_synth)

    s = _command(sub, "plan", help="fingerprint a manifest's training cases and write a commented config YAML for them")
    s.add_argument("manifest")
    s.add_argument("--output", default="config.yaml", help="config to write; the fingerprint goes beside it as <stem>.fingerprint.json (default: %(default)s)")
    s.add_argument("--memory", type=float, metavar="GB", help="memory budget for a training step (default: the GPU's free memory with --device cuda, else 2 GB)")
    _device_arg(s)
    s.set_defaults(func=cmd_plan)

    s = _command(sub, "train", help="train on a Decathlon-style manifest (dataset.json)")
    s.add_argument("manifest")
    _add_config_args(s, without="planned from the data as by volseg plan, kept in the run folder; --set overrides it")
    s.add_argument("--output", help="run folder (default: runs/<timestamp>)")
    s.add_argument("--resume", action="store_true", help="continue the run in --output from last.pt (with --set train.epochs=N to extend it)")
    s.add_argument("--folds", type=int, metavar="K", help="cross-validation: train K folds into --output/fold_0..fold_K-1 (one fold: --set data.fold=k)")
    s.add_argument("--pretrained", metavar="RUN_OR_CHECKPOINT",
                   help="start from another run's weights: a run folder, a fold folder, a checkpoint (best.pt) or a model exported by volseg export")
    _device_arg(s)
    s.set_defaults(func=cmd_train)

    s = _command(sub, "infer", help="segment scans with a trained run; masks come back in each scan's geometry")
    s.add_argument("inputs", nargs="+", metavar="INPUT", help="scan files, DICOM folders, folders of scans, or a manifest (its test list)")
    s.add_argument("--model", required=True, nargs="+", metavar="RUN_DIR",
                   help="run folder written by volseg train, or an nnU-Net v2 trained model folder (docs/nnunet.md); "
                        "a --folds folder or several run folders average their probabilities")
    s.add_argument("--output", help="output folder, or a file name for a single input (default: <case>_seg.nii.gz next to the input)")
    _device_arg(s)
    s.add_argument("--set", action="append", metavar="infer.KEY=VALUE",
                   help="override an inference setting of the run's config, repeatable (e.g. --set infer.overlap=0.25)")
    s.add_argument("--overlap", type=float, help="shortcut for --set infer.overlap=V: sliding-window overlap in [0, 1)")
    s.add_argument("--batch-size", type=int, help="shortcut for --set infer.batch_size=N: windows per forward pass")
    s.add_argument("--tta", action="store_true", help="shortcut for --set infer.tta=true: mirroring test-time augmentation")
    s.add_argument("--no-tta", action="store_true", help="shortcut for --set infer.tta=false (nnU-Net model folders mirror by default, as nnU-Net does)")
    s.add_argument("--folds", metavar="K[,K...]", help="the fold_K folders of a cross-validation or nnU-Net model folder to ensemble (default: all)")
    s.add_argument("--checkpoint", choices=["best", "last", "final"],
                   help="volseg runs: best (default) or last; nnU-Net model folders: final (default) or best")
    s.add_argument("--probabilities", action="store_true", help="also write class probabilities (<case>_prob.nii.gz: 4D uint8 with scl_slope 1/255; readers get floats in [0, 1])")
    s.add_argument("--format", default="nifti", metavar="F[,F...]",
                   help="mask formats, comma-separated: nifti (<case>_seg.nii.gz), dicom-seg (<case>_seg.dcm), rtstruct (<case>_rtstruct.dcm); "
                        "the DICOM ones need DICOM series inputs and pip install 'volseg[dicom]' (default: %(default)s)")
    s.add_argument("--statistics", action="store_true",
                   help="also write per-label volume, intensity (HU for CT), bounding box, centroid and components: <case>_stats.json, and statistics.csv for the batch")
    s.set_defaults(func=cmd_infer)

    s = _command(sub, "evaluate", help="Dice, IoU, HD95, ASSD, NSD and volumes of predictions against ground truth")
    s.add_argument("--pred", help="prediction file or folder")
    s.add_argument("--truth", help="ground-truth file, folder or manifest")
    s.add_argument("--cv", metavar="RUN_DIR", help="instead of --pred/--truth: a run's or a --folds folder's own validation predictions")
    s.add_argument("--labels", help="manifest whose 'labels' name the classes")
    s.add_argument("--output", help="folder for metrics.csv and summary.json")
    s.add_argument("--tolerance", type=float, default=2.0, help="surface Dice tolerance in mm (default: %(default)s)")
    s.add_argument("--images", help="scans (folder or manifest) to record beside each case, for report overlays")
    s.add_argument("--allow-missing", action="store_true", help="warn instead of failing when a reference case has no prediction")
    s.set_defaults(func=cmd_evaluate)

    s = _command(sub, "report", help="write a self-contained HTML summary of a run")
    s.add_argument("run_dir")
    s.add_argument("--eval-dir", help="evaluation folder (default: RUN_DIR/eval)")
    s.add_argument("--output", help="HTML file (default: RUN_DIR/report.html)")
    s.add_argument("--cases", nargs="+", metavar="CASE", help="cases for the 3D viewer (default: every evaluated case, worst first)")
    s.add_argument("--no-viewer", action="store_true", help="static report only (no embedded 3D viewer)")
    s.set_defaults(func=cmd_report)

    s = _command(sub, "view", help="write a self-contained 3D viewer page of one scan with its mask and truth")
    s.add_argument("scan", help="scan file or DICOM folder")
    s.add_argument("--mask", help="predicted label map on the scan's grid")
    s.add_argument("--truth", help="reference label map on the scan's grid")
    s.add_argument("--labels", help="manifest (dataset.json) or run folder whose labels name the classes")
    s.add_argument("--output", help="HTML file (default: <scan name>_view.html beside the scan)")
    s.add_argument("--open", action="store_true", help="open the page in the default browser")
    s.set_defaults(func=cmd_view)

    s = _command(sub, "export", help="export the network for deployment (TorchScript or ONNX)")
    s.add_argument("run_dir", help="a volseg run folder, or an nnU-Net v2 model folder")
    s.add_argument("--format", choices=["torchscript", "onnx"], default="torchscript")
    s.add_argument("--output", help="output file (default: RUN_DIR/model.<ext>; nnU-Net: RUN_DIR/fold_K/model.<ext>)")
    s.add_argument("--fold", help="nnU-Net model folders: the fold to export (needed when there are several)")
    s.set_defaults(func=cmd_export)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # tables use "±"; never crash on an ASCII locale
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    level = logging.DEBUG if args.verbose else (logging.WARNING if args.quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s", stream=sys.stderr)
    logging.getLogger("ignite").setLevel(logging.WARNING)
    from .config import ConfigError
    from .data.io import ImageReadError, UnsafeOutputError
    from .data.manifest import ManifestError
    from .evaluation import EvaluationError
    from .viz import ViewerError

    try:
        return args.func(args)
    except (ConfigError, ManifestError, ImageReadError, UnsafeOutputError, EvaluationError, ViewerError, OSError) as exc:
        # OSError: missing files, permissions, a file where a folder should be, a full disk;
        # its message names the path
        if args.verbose:
            raise
        print(f"volseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
