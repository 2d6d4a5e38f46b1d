"""Training under torchrun: real 2-process ``gloo`` jobs on the CPU (``python -m
torch.distributed.run -m volseg train``, as users start them), on tiny phantoms.

(a) the first optimisation step of 2 ranks equals that of 1 process with twice the batch;
(b) a 2-rank resume continues exactly, and a 2-rank run resumes on 1 process;
(c) only rank 0 writes the run folder, and other ranks log warnings only;
(d) validation is split over the ranks and gives the score of one process validating it all.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from volseg.config import AugmentConfig, load_config
from volseg.runfolder import read_config, read_plan
from volseg.training import engine, train

ROOT = Path(__file__).resolve().parent.parent
NO_AUGMENT = [f"augment.{f.name}=0" for f in dataclasses.fields(AugmentConfig) if f.name.endswith("_prob")]
BASE = ["model.features=[4,8]", "model.norm=instance", "data.samples_per_volume=2", "train.batch_size=2", "train.val_every=1",
        "train.amp=false", "infer.overlap=0.25"]

pytestmark = pytest.mark.slow  # several torchrun trainings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, tmp: Path, nproc: int = 2) -> Path:
    """``torchrun --nproc_per_node nproc -m volseg train ...``; each rank's output is kept in
    its own file (torchrun ``--log-dir --redirects``), returned as the folder holding them."""
    logs = tmp / f"torchrun_logs_{_free_port()}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "--log-dir", str(logs), "--redirects", "3", "-m", "volseg", *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=240)
    if done.returncode != 0:
        out = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted(logs.rglob("std*.log")))
        pytest.fail(f"torchrun exited {done.returncode}:\n{done.stderr[-2000:]}\n{out}")
    return logs


def _rank_log(logs: Path, rank: int) -> str:
    (path,) = [p for p in logs.rglob("stderr.log") if p.parent.name in (str(rank), f"default_{rank}")] or [None]
    assert path is not None, f"no stderr.log of rank {rank} under {logs}: {sorted(logs.rglob('*'))}"
    return path.read_text()


def _sets(overrides):
    return sum((["--set", s] for s in overrides), [])


def _train_args(manifest: Path, run: Path, overrides, resume: bool = False, device: str = "cpu"):
    config = ["--resume"] if resume else ["--config", str(ROOT / "configs" / "default.yaml")]
    return ["train", str(manifest), *config, "--output", str(run), "--device", device, *_sets(overrides)]


def _rows(run: Path):
    lines = (run / "metrics.csv").read_text(encoding="utf-8").strip().splitlines()
    return [dict(zip(lines[0].split(","), ln.split(","))) for ln in lines[1:]]


def _weights(path: Path) -> torch.Tensor:
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    return torch.cat([v.flatten().double() for v in state.values()])


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """6 phantoms on one isotropic grid (about 28x28x20 voxels, in some orientation)."""
    from volseg.data.synth import make_dataset

    return make_dataset(tmp_path_factory.mktemp("ddp_data"), cases=6, test_cases=0, shape=(28, 28, 20), spacing=(1.5, 1.5, 1.5), seed=3)


def _manifest(tmp: Path, phantoms: Path, train_idx, val_idx) -> Path:
    data = json.loads(phantoms.read_text(encoding="utf-8"))
    entries = [{k: str((phantoms.parent / v).resolve()) for k, v in e.items()} for e in data["training"]]
    data.update(training=[entries[i] for i in train_idx], validation=[entries[i] for i in val_idx], test=[])
    path = tmp / "dataset.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# (a) the first step: DDP averages the gradients of the ranks' batches


def test_two_ranks_first_step_equals_one_process_with_twice_the_batch(phantoms, tmp_path, monkeypatch):
    """Deterministic batches: a patch bigger than every phantom (so a crop is the whole padded
    volume), no augmentation, instance norm (per sample) and a pure cross-entropy loss (a mean,
    so the mean of two half-batch gradients is the whole batch's). Rank 0 trains on case 0, rank 1
    on case 1 (their shards), 2 patches each; the 1-process run takes cases 0 and 1 in order, 4
    patches. SGD without clipping is linear in the gradient, so summed instead of averaged
    gradients (twice the step) fail this as surely as no all-reduce at all (case 0's step)."""
    manifest = _manifest(tmp_path, phantoms, [0, 1], [2])
    step = BASE + NO_AUGMENT + ["data.patch_size=[32,32,32]", "train.epochs=1", "train.steps_per_epoch=1", "train.optimizer=sgd",
                                "train.lr=0.05", "train.weight_decay=0", "train.grad_clip=0", "train.lambda_dice=0"]
    _torchrun(_train_args(manifest, tmp_path / "ddp", step), tmp_path)

    def one_process(name: str, order) -> Path:
        monkeypatch.setattr(engine, "_sampler", lambda ds, n, gen: [order[i % len(order)] for i in range(n)])
        return train(manifest, load_config(ROOT / "configs" / "default.yaml", step + ["train.batch_size=4"]), tmp_path / name, device="cpu")

    both = one_process("one", [0, 1])
    only_case0 = one_process("case0", [0, 0])  # what rank 0 would do without the all-reduce
    from monai.utils import set_determinism

    set_determinism(seed=0)
    initial = engine.build_parts(read_config(both), read_plan(both), "cpu").model.state_dict()  # the seeded start of all three
    start = torch.cat([v.flatten().double() for v in initial.values()])
    d_ddp, d_one, d_case0 = (_weights(r / "last.pt") - start for r in (tmp_path / "ddp", both, only_case0))
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert d_one.norm() > 1e-3 and rel(d_case0, d_one) > 0.05, "the two cases must give clearly different steps"
    assert rel(d_ddp, d_one) < 1e-4, f"2-rank step differs from the 1-process step by {rel(d_ddp, d_one):.2e} (relative)"


# --------------------------------------------------------------------------------------------
# (b)-(d) one 2-rank run uninterrupted, one stopped after epoch 1 and resumed on 2, then on 1


# constant lr (extending a run changes nothing); disk cache: each rank fills its own cases
RUN = BASE + ["data.patch_size=[24,24,16]", "train.steps_per_epoch=2", "train.poly_power=0", "data.cache=disk"]


@pytest.fixture(scope="module")
def ddp_runs(phantoms, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp_runs")
    manifest = _manifest(tmp, phantoms, [0, 1, 2], [3, 4, 5])
    whole_logs = _torchrun(_train_args(manifest, tmp / "whole", RUN + ["train.epochs=2"]), tmp)
    _torchrun(_train_args(manifest, tmp / "resumed", RUN + ["train.epochs=1"]), tmp)
    _torchrun(_train_args(manifest, tmp / "resumed", ["train.epochs=2"], resume=True), tmp)
    return {"manifest": manifest, "whole": tmp / "whole", "whole_logs": whole_logs, "resumed": tmp / "resumed",
            "weights_at_2": _weights(tmp / "resumed" / "last.pt"), "resumed_events": len(list((tmp / "resumed" / "tb").iterdir()))}


def test_two_rank_resume_continues_exactly_and_one_rank_can_resume_it(ddp_runs, caplog):
    whole, resumed = ddp_runs["whole"], ddp_runs["resumed"]
    assert torch.equal(ddp_runs["weights_at_2"], _weights(whole / "last.pt")), "1 epoch + resume on 2 ranks != 2 epochs on 2 ranks"
    ckpt = torch.load(resumed / "last.pt", map_location="cpu", weights_only=True)
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0]["sampler"], ckpt["rng"][1]["sampler"])
    assert not any(k.startswith("module.") for k in ckpt["model"])  # the unwrapped network

    with caplog.at_level("INFO", logger="volseg"):
        train(ddp_runs["manifest"], load_config(None, ["train.epochs=3"]), resumed, resume=True, device="cpu")
    assert "written by 2 process(es), resumed by 1" in caplog.text
    assert [r["epoch"] for r in _rows(resumed)] == ["1", "2", "3"]
    assert not torch.equal(_weights(resumed / "last.pt"), ddp_runs["weights_at_2"])
    assert len(torch.load(resumed / "last.pt", map_location="cpu", weights_only=True)["rng"]) == 1


def test_only_rank_zero_writes_the_run_folder_and_logs(ddp_runs):
    whole = ddp_runs["whole"]
    files = sorted(p.relative_to(whole).as_posix() for p in whole.rglob("*") if p.is_file())
    events = [f for f in files if f.startswith("tb/")]
    val = sorted(f for f in files if f.startswith("val_predictions/"))
    assert [f for f in files if not f.startswith(("tb/", "val_predictions/"))] == [
        ".lock", "best.pt", "config.yaml", "dataset.json", "fingerprint.json", "last.pt", "metrics.csv", "plan.json", "postprocessing.json",
        "train.log", "versions.json"]
    # the final validation predictions: one file per validation case, written once (by rank 0)
    assert len([f for f in val if f.endswith("_seg.nii.gz")]) == len(json.loads((whole / "dataset.json").read_text())["validation"])
    assert len(events) == 1, f"one TensorBoard writer expected, found {events}"
    assert [r["epoch"] for r in _rows(whole)] == ["1", "2"]
    log = (whole / "train.log").read_text(encoding="utf-8")
    assert len(re.findall(r"epoch 2/2 loss", log)) == 1
    rank0, rank1 = (_rank_log(ddp_runs["whole_logs"], r) for r in (0, 1))
    for info in ("data cache disk", "validation split over 2 processes", "epoch 2/2 loss"):  # rank 1: warnings only
        assert info in rank0 and info not in rank1, info
    assert ddp_runs["resumed_events"] == 2  # one TensorBoard writer per launch of the resumed run
    (cache,) = (whole.parent / "volseg_cache").iterdir()  # both runs share one plan, so one cache
    assert [len(list((cache / s).glob("*.pt"))) for s in ("train", "val")] == [3, 3]


def test_validation_is_split_over_ranks_and_matches_one_process(ddp_runs):
    from volseg.data.manifest import load_manifest
    from volseg.inference import Predictor
    from volseg.metrics import dice_per_class
    from volseg.preprocessing.pipeline import preprocess_case
    from volseg.runfolder import stored_split

    whole = ddp_runs["whole"]
    log = (whole / "train.log").read_text(encoding="utf-8")
    assert "validation split over 2 processes: 2+1 cases" in log
    per_rank = re.findall(r"validation cases per rank: rank 0: (.*); rank 1: (.*)", log)[-1]
    names0, names1 = (set(s.split()) for s in per_rank)
    val_names = json.loads((whole / "dataset.json").read_text(encoding="utf-8"))["validation"]
    assert names0.isdisjoint(names1) and names0 | names1 == set(val_names) and len(names0) == 2

    # as validation during training: no learned postprocessing (postprocessing.json is learned after it)
    pred = Predictor.from_run(whole, device="cpu", checkpoint="last", overrides={"largest_component": []})
    plan = read_plan(whole)
    scores = []
    for case in stored_split(whole, load_manifest(ddp_runs["manifest"]))[1]:
        data = preprocess_case(case, plan)
        scores.append(dice_per_class(pred.predict_index(data["image"]), np.asarray(data["label"])[0], plan.num_classes))
    one_process = float(np.mean(np.array(scores).mean(0)))
    assert float(_rows(whole)[-1]["val_dice_mean"]) == pytest.approx(one_process, abs=1e-5)


# --------------------------------------------------------------------------------------------
# nccl: two GPUs or more


@pytest.mark.cuda
def test_two_gpus_train_with_nccl_and_resume(phantoms, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs (one process per GPU)")
    manifest = _manifest(tmp_path, phantoms, [0, 1, 2], [3, 4])
    _torchrun(_train_args(manifest, tmp_path / "run", RUN + ["train.epochs=1", "train.amp=true"], device="cuda"), tmp_path)
    _torchrun(_train_args(manifest, tmp_path / "run", ["train.epochs=2"], resume=True, device="cuda"), tmp_path)
    assert [r["epoch"] for r in _rows(tmp_path / "run")] == ["1", "2"]
    assert len(torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)["rng"]) == 2
