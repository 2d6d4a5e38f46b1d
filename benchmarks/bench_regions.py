"""Region labels, sparse annotation and fine-tuning on the tumour phantoms (volseg synth --task tumor).

Three questions, each answered on the same held-out test phantoms (full labels), Dice per region
(whole tumour, tumour core, enhancing), mean over the test cases, for every seed:

1. ``regions``: region training (3 sigmoid outputs, BCE + Dice per region) against label
   training (4-class softmax) of the same data, same steps; the label model's masks are scored
   as regions too (the manifest's regions applied to its label maps).
2. ``sparse``: every K-th axial slice of the training labels annotated (the rest ``ignore``),
   K in ``--sparse``, against K = 1 (full), same steps: how much annotation can be saved.
3. ``finetune``: validation steps to reach ``--target`` mean region Dice from scratch against from
   a run trained on a related task (label training on phantoms of other seeds: its output head
   differs, so it is re-initialised). Validation after every ``--val-every`` steps; "never" when
   the target is not reached within ``--steps``.

Baseline in the same run: label training (1), full annotation (2), from scratch (3). Nothing
here is asserted by the tests. Usage::

    python benchmarks/bench_regions.py --threads 2                    # the full ask: 3 seeds
    python benchmarks/bench_regions.py --seeds 0 --steps 30 --quick   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

REGIONS = ("whole tumor", "tumor core", "enhancing tumor")


def _config(steps: int, val_every_steps: int, seed: int, features, patch):
    from volseg.config import load_config

    epochs = max(1, steps // val_every_steps)
    return load_config(None, [f"model.features={list(features)}", "model.norm=instance", f"data.patch_size={list(patch)}",
                              "data.samples_per_volume=2", "data.val_fraction=0.25", "data.min_cases=1", f"train.epochs={epochs}",
                              f"train.steps_per_epoch={val_every_steps}", "train.batch_size=2", "train.val_every=1", f"train.seed={seed}",
                              "infer.overlap=0.25", "data.cache=memory"])


def _label_manifest(region_manifest: Path) -> Path:
    """The same data with one class per label value (MSD style)."""
    man = json.loads(region_manifest.read_text(encoding="utf-8"))
    labels = {"0": "background", "1": "edema", "2": "necrosis", "3": "enhancing"}
    if "ignore" in man["labels"]:
        labels["4"] = "ignore"
    man["labels"] = labels
    man.pop("regions_class_order", None)
    out = region_manifest.with_name("dataset_labels.json")
    out.write_text(json.dumps(man), encoding="utf-8")
    return out


def _test_dice(run: Path, region_manifest: Path, work: Path) -> Dict[str, float]:
    from volseg.evaluation import evaluate
    from volseg.inference import collect_inputs, infer_many

    pred = work / f"pred_{run.name}"
    infer_many(collect_inputs([str(region_manifest.parent / "imagesTs")], pred), run, device="cpu")
    summary = evaluate(pred, region_manifest).summary  # the manifest's regions, for region and label models alike
    return {r: float(summary["classes"][r]["dice"]["mean"]) for r in REGIONS}


def _train(manifest: Path, cfg, run: Path, pretrained=None) -> float:
    from volseg.training import train

    t0 = time.perf_counter()
    train(manifest, cfg, run, device="cpu", pretrained=pretrained)
    return time.perf_counter() - t0


def _steps_to_target(run: Path, target: float, every: int) -> object:
    lines = (run / "metrics.csv").read_text(encoding="utf-8").splitlines()
    head = lines[0].split(",")
    for ln in lines[1:]:
        row = dict(zip(head, ln.split(",")))
        if float(row["val_dice_mean"]) >= target:
            return int(row["epoch"]) * every
    return "never"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--val-every", type=int, default=10, help="steps between validations (finetune)")
    ap.add_argument("--sparse", type=int, nargs="+", default=[2, 5, 10])
    ap.add_argument("--target", type=float, default=0.6, help="mean validation region Dice (finetune)")
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--test-cases", type=int, default=3)
    ap.add_argument("--shape", type=int, nargs=3, default=[40, 40, 32])
    ap.add_argument("--features", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--patch", type=int, nargs=3, default=[32, 32, 32])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="+", default=["regions", "sparse", "finetune"])
    ap.add_argument("--json", help="write the raw figures here")
    args = ap.parse_args()

    import torch

    from volseg.data.synth import make_tumor_dataset

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    results: Dict[str, List[dict]] = {"regions": [], "sparse": [], "finetune": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for seed in args.seeds:
            cfg = _config(args.steps, args.steps, seed, args.features, args.patch)
            data = {k: make_tumor_dataset(work / f"s{seed}_k{k}", cases=args.cases, test_cases=args.test_cases, seed=100 + seed,
                                          shape=args.shape, sparse=k) for k in [1] + (args.sparse if "sparse" in args.only else [])}
            full = data[1]
            if "regions" in args.only or "sparse" in args.only:
                s = _train(full, cfg, work / f"region_s{seed}_k1")
                region_full = _test_dice(work / f"region_s{seed}_k1", full, work)
            if "regions" in args.only:
                s_lab = _train(_label_manifest(full), cfg, work / f"label_s{seed}")
                results["regions"].append({"seed": seed, "region": region_full, "label": _test_dice(work / f"label_s{seed}", full, work),
                                           "train_s": {"region": s, "label": s_lab}})
            if "sparse" in args.only:
                results["sparse"].append({"seed": seed, "k": 1, "dice": region_full})
                for k in args.sparse:
                    _train(data[k], cfg, work / f"region_s{seed}_k{k}")
                    results["sparse"].append({"seed": seed, "k": k, "dice": _test_dice(work / f"region_s{seed}_k{k}", full, work)})
            if "finetune" in args.only:
                src_data = make_tumor_dataset(work / f"src_s{seed}", cases=args.cases, test_cases=0, seed=200 + seed, shape=args.shape)
                src = work / f"src_run_s{seed}"
                _train(_label_manifest(src_data), cfg, src)
                fcfg = _config(args.steps, args.val_every, seed, args.features, args.patch)
                row = {"seed": seed}
                for name, pre in (("scratch", None), ("finetune", src)):
                    run = work / f"ft_{name}_s{seed}"
                    _train(full, fcfg, run, pretrained=pre)
                    row[name] = _steps_to_target(run, args.target, args.val_every)
                results["finetune"].append(row)
            print(json.dumps({k: v for k, v in results.items() if v}, indent=1), flush=True)
    _report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")


def _mean(rows: List[Dict[str, float]]) -> str:
    return " / ".join(f"{np.mean([r[k] for r in rows]):.3f}" for k in REGIONS)


def _report(results: Dict[str, List[dict]], args) -> None:
    print(f"\nseeds {args.seeds}, {args.steps} steps, {args.cases} training + {args.test_cases} test phantoms {args.shape}, "
          f"features {args.features}, patch {args.patch}; Dice whole tumour / tumour core / enhancing, mean over seeds")
    if results["regions"]:
        reg, lab = [r["region"] for r in results["regions"]], [r["label"] for r in results["regions"]]
        print(f"label training (baseline): {_mean(lab)}\nregion training:           {_mean(reg)}")
    if results["sparse"]:
        for k in sorted({r["k"] for r in results["sparse"]}):
            rows = [r["dice"] for r in results["sparse"] if r["k"] == k]
            print(f"every {k:>2}th slice annotated ({100 / k:5.1f}% of the slices): {_mean(rows)}")
    if results["finetune"]:
        print(f"steps to mean validation Dice {args.target}: " + "; ".join(f"seed {r['seed']}: scratch {r['scratch']}, fine-tuned {r['finetune']}"
                                                                        for r in results["finetune"]))


if __name__ == "__main__":
    main()
