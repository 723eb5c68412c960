"""PyTorch against OpenVINO on this CPU: model only and end to end (``visionflow score`` on the
same folder), side by side in one run, on a ResNet-50 trained here on real photos.

What it does:

1. **Data**: crops patches from scikit-learn's two sample photos (real JPEG-like content), one
   class per vertical strip of each photo (6 classes), written as JPEGs: a training folder and a
   separate folder to score.
2. **Model**: trains ResNet-50 (random init, no download) for a few epochs at ``--image-size``
   and packages it (safetensors + metadata), the way training does.
3. **Export**: :func:`cvlib.inference.export.export_package`: OpenVINO IR, NNCF int8 calibrated
   on up to 300 training images, agreement with fp32 on the validation split (printed).
4. **Model only**: the scoring forward of each engine on the same preprocessed batches
   (torch: bf16 where native, BN folded, channels-last; OpenVINO: the verified IR with the
   throughput hint), rounds interleaved so that load from other processes hits both alike.
5. **End to end**: ``visionflow score FOLDER --engine torch|openvino`` in subprocesses,
   interleaved, each into a fresh output; images/s as the CLI reports it (decode + model +
   Parquet, without process start-up). ``--sweep`` adds decode-worker x stream settings.

    PYTHONPATH=. python benchmarks/engines.py [--image-size 128] [--epochs 3] [--rounds 3] [--sweep]

Figures on a shared machine are noisy: read the ratios of interleaved rounds, not one number.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def make_photos(out: Path, per_class: int, seed: int, min_side: int = 96, max_side: int = 256) -> list[str]:
    """Random square patches of the two sample photos; the class is the photo and the third of
    it the patch centre falls in. Returns the class names."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = load_sample_images()
    classes = []
    for name, img in zip(("china", "flower"), photos.images, strict=True):
        h, w, _ = img.shape
        for strip in range(3):
            label = f"{name}-{strip}"
            classes.append(label)
            (out / label).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                side = int(rng.integers(min_side, max_side))
                cx = int(rng.integers(strip * w // 3, (strip + 1) * w // 3))
                x0 = int(np.clip(cx - side // 2, 0, w - side))
                y0 = int(rng.integers(0, h - side))
                patch = Image.fromarray(img[y0 : y0 + side, x0 : x0 + side])
                patch.save(out / label / f"{label}-{i:04d}.jpg", quality=90)
    return classes


def train_resnet50(data: Path, image_size: int, epochs: int, out: Path):
    """ResNet-50, random init, trained on the folder's training split; returns (model, meta,
    manifest, seconds)."""
    from cvlib.data.datasets import ManifestDataset
    from cvlib.data.ingest import build_manifest
    from cvlib.data.transforms import eval_preset_from
    from cvlib.models.factory import create_model
    from cvlib.training.checkpoint import save_package

    manifest, _ = build_manifest(data)
    classes = sorted(manifest["label"].unique())
    pre = {"image_size": image_size, "resize_size": int(image_size * 1.14), "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    meta = {"arch": "resnet50", "class_names": classes, "preprocessing": pre, "head": {"hidden_dim": 256, "dropout": 0.0}}
    ds = ManifestDataset(data, manifest, "train", eval_preset_from(pre))
    index = {c: i for i, c in enumerate(classes)}
    rows = manifest[(manifest["status"] == "ok") & (manifest["split"] == "train")]
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([index[c] for c in rows["label"]])
    torch.manual_seed(0)
    model = create_model("resnet50", len(classes), weights="none", hidden_dim=256, dropout=0.0).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-3, weight_decay=1e-4)
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), 32):
            idx = order[s : s + 32]
            xb = x[idx].flip(3) if epoch % 2 else x[idx]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xb.contiguous(memory_format=torch.channels_last)), y[idx])
            loss.backward()
            opt.step()
        print(f"  epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}", flush=True)
    model.eval()
    save_package(model, meta, out)
    return model, meta, manifest, time.perf_counter() - t0


def model_only(model, meta, engine, batches: list[torch.Tensor], rounds: int) -> dict[str, list[float]]:
    """img/s of the scoring forward of each engine over the same batches, rounds interleaved."""
    from cvlib.inference.loop import InferenceForward
    from cvlib.models.precision import inference_dtype

    dev = torch.device("cpu")
    forward = InferenceForward(model, dev, inference_dtype("auto", dev), fuse=True)
    runs = {"torch": lambda b: forward(b), "openvino": engine}
    n = sum(len(b) for b in batches)
    with torch.inference_mode():
        for fn in runs.values():  # warm-up
            fn(batches[0])
        out: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(rounds):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                for b in batches:
                    fn(b)
                out[name].append(n / (time.perf_counter() - t0))
    return out


def score_cli(folder: Path, package: Path, out: Path, engine: str, env: dict, workers: int, streams: int) -> float:
    cmd = [sys.executable, "-m", "flows.cli", "score", str(folder), "--model", str(package), "--out", str(out),
           "--engine", engine, "--loader-workers", str(workers), "--batch-size", "32"]  # fmt: skip
    if streams:
        cmd += ["--ov-streams", str(streams)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    m = re.search(r"images/s\W+([0-9.]+)", proc.stdout)
    if not m:
        raise RuntimeError(f"no images/s in the output:\n{proc.stdout[-2000:]}")
    return float(m.group(1))


def _fmt(values: list[float]) -> str:
    return f"{statistics.median(values):7.1f}  (" + ", ".join(f"{v:.1f}" for v in values) + ")"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=80, help="training images per class (6 classes)")
    p.add_argument("--score-per-class", type=int, default=64, help="images per class in the folder scored end to end")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--loader-workers", type=int, default=1)
    p.add_argument("--sweep", action="store_true", help="also end to end over decode workers x OpenVINO streams")
    p.add_argument("--workdir", help="keep the data, model and outputs here (default: a temporary folder)")
    p.add_argument("--reuse", action="store_true", help="reuse the workdir's trained and exported package (skip training and export)")
    args = p.parse_args()

    from cvlib.inference.engines import OpenVINOEngine, choose_engine
    from cvlib.inference.export import Agreement, export_package, validation_loader
    from cvlib.inference.options import ExportConfig

    work = Path(args.workdir or tempfile.mkdtemp(prefix="visionflow-engines-"))
    print(f"work folder: {work}; {os.cpu_count()} CPUs (shared: figures are noisy, read the ratios)")
    package = work / "package"
    classes = make_photos(work / "train", args.per_class, seed=0) if not args.reuse else sorted(p.name for p in (work / "train").iterdir())
    make_photos(work / "score", args.score_per_class, seed=1)
    print(f"data: {len(classes)} classes x {args.per_class} training patches; {len(classes) * args.score_per_class} to score")
    if args.reuse:
        from cvlib.data.ingest import build_manifest
        from cvlib.inference.export import ExportRecord
        from cvlib.training.checkpoint import load_package

        model, meta = load_package(package)
        manifest = build_manifest(work / "train")[0]
        saved = json.loads((package / "openvino" / "export.json").read_text())
        record = ExportRecord(**(saved | {"candidates": [Agreement(**c) for c in saved["candidates"]]}))
        print(f"reusing {package} (trained at {meta['preprocessing']['image_size']} px)")
    else:
        print(f"training ResNet-50 at {args.image_size} px for {args.epochs} epochs ...", flush=True)
        model, meta, manifest, secs = train_resnet50(work / "train", args.image_size, args.epochs, package)
        print(f"  trained in {secs:.0f}s")
        t0 = time.perf_counter()
        record = export_package(model, meta, work / "train", manifest, package / "openvino", ExportConfig())
        print(f"export + int8 calibration ({record.calibration_images} images) + agreement: {time.perf_counter() - t0:.0f}s")
    print(f"  validation: {record.val_images} images, fp32 top-1 {record.val_top1_fp32:.4f}")
    for c in record.candidates:
        print(f"  {c.precision:5s}: top-1 agreement {c.top1_agreement:.4f}, top-5 overlap {c.top5_agreement:.4f}, "
              f"val top-1 {c.val_top1:.4f} -> {'verified' if c.passed else 'rejected'}")  # fmt: skip
    print(f"  decision: {record.status} {record.precision or ''}: {record.reason}")

    choice = choose_engine("openvino", torch.device("cpu"), package)
    engine = OpenVINOEngine(choice.xml, int8=choice.int8, precision_hint=choice.precision_hint)
    print(f"OpenVINO engine: {choice.reason}; precision {engine.precision}, {engine.streams} streams, {engine.requests} requests")
    val = validation_loader(meta, work / "train", manifest, batch_size=32)
    batches = [b for b, _ in val][:4]
    while sum(len(b) for b in batches) < 128:
        batches = batches + batches
    mo = model_only(model, meta, engine, batches, args.rounds)
    ratio = [o / t for o, t in zip(mo["openvino"], mo["torch"], strict=True)]
    print(f"\nmodel only, ResNet-50 at {meta['preprocessing']['image_size']} px, batch 32, img/s (median (rounds)):")
    print(f"  torch (bf16 where native, BN folded) {_fmt(mo['torch'])}")
    print(f"  openvino {engine.precision:4s}                     {_fmt(mo['openvino'])}")
    print(f"  ratio openvino/torch per round: {', '.join(f'{r:.2f}x' for r in ratio)}")

    env = dict(os.environ, PYTHONPATH=str(ROOT), VISIONFLOW_HOME=str(work / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1")  # fmt: skip
    settings = [(args.loader_workers, 0)]
    if args.sweep:
        settings += [(w, s) for w in (1, 2) for s in (1, 2) if (w, s) != (args.loader_workers, 0)]
    e2e: dict[tuple, dict[str, list[float]]] = {}
    try:
        for r in range(args.rounds):
            for workers, streams in settings:
                row = e2e.setdefault((workers, streams), {"torch": [], "openvino": []})
                for name in ("torch", "openvino"):
                    if name == "torch" and streams:
                        continue  # streams are OpenVINO's
                    out = work / "out" / f"{name}-w{workers}-s{streams}-r{r}"
                    row[name].append(score_cli(work / "score", package, out, name, env, workers, streams))
                    print(f"  round {r + 1}: {name:8s} workers {workers} streams {streams or 'auto'}: {row[name][-1]:.1f} img/s", flush=True)
    finally:
        subprocess.run([sys.executable, "-m", "flows.cli", "server", "stop"], cwd=ROOT, env=env, capture_output=True)
    print(f"\nend to end, `visionflow score` on {len(classes) * args.score_per_class} JPEGs, img/s (median (rounds)):")
    base = e2e[(args.loader_workers, 0)]["torch"]
    for (workers, streams), row in e2e.items():
        if row["torch"]:
            print(f"  torch    loader-workers {workers}            {_fmt(row['torch'])}")
        print(f"  openvino loader-workers {workers} streams {streams or 'auto'} {_fmt(row['openvino'])}  "
              f"ratio to torch: {statistics.median(row['openvino']) / statistics.median(base):.2f}x")  # fmt: skip
    summary = {
        "image_size": args.image_size, "agreement": [c.__dict__ for c in record.candidates], "decision": record.status,
        "precision": record.precision, "model_only": mo, "end_to_end": {f"w{w}-s{s}": v for (w, s), v in e2e.items()},
    }  # fmt: skip
    (work / "engines.json").write_text(json.dumps(summary, indent=2))
    print(f"\nfigures: {work / 'engines.json'}")


if __name__ == "__main__":
    main()
