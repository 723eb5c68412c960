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
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def make_photos(out: Path, per_class: int, seed: int, min_side: int = 96, max_side: int = 208, scale: float = 1.0) -> list[str]:
    """Random square patches of the two sample photos, one class per vertical third of each photo
    (6 classes), each patch wholly inside its third (so the classes are separable and a trained
    model has clear margins), saved as JPEGs ``scale`` times their cropped size (``scale`` > 1:
    photo-sized files, whose decode cost is what a scoring fleet pays). Returns the class names."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = load_sample_images()
    classes = []
    for name, img in zip(("china", "flower"), photos.images, strict=True):
        h, w, _ = img.shape
        third = w // 3
        for strip in range(3):
            label = f"{name}-{strip}"
            classes.append(label)
            (out / label).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                side = int(rng.integers(min_side, min(max_side, third) + 1))
                x0 = int(rng.integers(strip * third, (strip + 1) * third - side + 1))
                y0 = int(rng.integers(0, h - side + 1))
                patch = Image.fromarray(img[y0 : y0 + side, x0 : x0 + side])
                if scale != 1.0:
                    patch = patch.resize((round(side * scale),) * 2, Image.Resampling.BICUBIC)
                patch.save(out / label / f"{label}-{i:04d}.jpg", quality=90)
    return classes


def train_resnet50(data: Path, image_size: int, epochs: int, out: Path, workers: int):
    """ResNet-50, random init, trained on the folder's training split by the project's own
    :func:`cvlib.training.fit.fit` with the retrain configuration's recipe (AdamW, warm-up + cosine
    per step, label smoothing, augmentation), at ``image_size``; the best epoch is packaged.
    Returns (model, meta, manifest, fit result, seconds)."""
    from cvlib.config import RetrainConfig
    from cvlib.data.ingest import build_manifest
    from cvlib.training.checkpoint import model_from_checkpoint, save_package
    from cvlib.training.fit import fit

    config = RetrainConfig()
    manifest, _ = build_manifest(data, config.data)
    classes = sorted(manifest["label"].unique())
    train = config.train.model_copy(update={
        "arch": "resnet50", "weights": "none", "epochs": epochs, "device": "cpu", "num_workers": workers, "progress": False,
    })  # fmt: skip
    augment = config.augment.model_copy(update={"image_size": image_size})
    t0 = time.perf_counter()
    result = fit(data_root=data, manifest=manifest, class_names=classes, train=train, augment=augment, out_dir=out / "checkpoints",
                 on_epoch=lambda r: print(f"  epoch {r.epoch}/{epochs}: train loss {r.train_loss:.3f}, val loss {r.val_loss:.3f}, "
                                          f"val top-1 {r.val_top1:.3f} ({r.seconds:.0f}s)", flush=True))  # fmt: skip
    seconds = time.perf_counter() - t0
    model, meta = model_from_checkpoint(result.best_checkpoint)
    save_package(model, meta, out / "package")
    return model, meta, manifest, result, seconds


def forced_int8_package(package: Path, dst: Path) -> Path:
    """A copy of ``package`` whose export record says its int8 IR is verified, whatever the gate
    decided: only so that the benchmark can time int8 end to end when the gate rejected it (the
    figures say so). Never used for anything but timing."""
    from cvlib.inference.engines import EXPORT_RECORD
    from cvlib.inference.export import INT8_FILE

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(package, dst)
    path = dst / "openvino" / EXPORT_RECORD
    record = json.loads(path.read_text())
    record.update(status="verified", precision="int8", file=INT8_FILE, reason="forced by benchmarks/engines.py for timing")
    path.write_text(json.dumps(record, indent=2))
    return dst


def model_only(runs: dict, batches: list[torch.Tensor], rounds: int) -> dict[str, list[float]]:
    """img/s of each engine's scoring forward over the same batches, rounds interleaved."""
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


def decode_cost(folder: Path, meta: dict, n: int = 96) -> dict[str, float]:
    """Milliseconds per image of what one decode worker does for scoring, by stage: read and
    hash, JPEG decode (in draft mode as scoring does it, and in full), resize and crop (uint8),
    float conversion and normalisation; and the whole item as :class:`ScoringDataset` makes it."""
    import hashlib

    from torchvision.transforms import v2 as T

    from cvlib.data.imageio import load_rgb
    from cvlib.data.transforms import eval_preset_from
    from cvlib.inference.decoding import ScoringDataset

    pre = meta["preprocessing"]
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg"))[:n]
    preset = eval_preset_from(pre)
    draft = (int(pre["resize_size"]),) * 2
    geometric = T.Compose([T.PILToTensor(), T.Resize(int(pre["resize_size"]), antialias=True), T.CenterCrop(int(pre["image_size"]))])
    numeric = T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize(pre["mean"], pre["std"])])
    data = [(folder / f).read_bytes() for f in files]

    def per_image(fn, items) -> tuple[float, list]:
        t0 = time.perf_counter()
        out = [fn(x) for x in items]
        return 1000 * (time.perf_counter() - t0) / len(items), out

    ms: dict[str, float] = {}
    ms["read_hash"], _ = per_image(lambda f: hashlib.sha256((folder / f).read_bytes()).hexdigest(), files)
    ms["decode_full"], _ = per_image(load_rgb, data)
    ms["decode_draft"], images = per_image(lambda d: load_rgb(d, draft_size=draft), data)
    ms["resize_crop"], crops = per_image(geometric, images)
    ms["float_normalize"], _ = per_image(numeric, crops)
    for name, size in (("item_draft", int(pre["resize_size"])), ("item_full", 1 << 30)):
        ds = ScoringDataset(folder, files, preset, draft_size=size)
        ms[name], _ = per_image(ds.__getitem__, range(len(ds)))
    return ms


def draft_agreement(model, meta: dict, folder: Path, n: int = 384) -> tuple[float, int, int]:
    """Top-1 agreement of the fp32 model on scoring's draft-mode decodes against full decodes of
    the same files, and how many of them draft mode decoded smaller (the only ones it can change)."""
    from PIL import Image

    from cvlib.data.transforms import eval_preset_from
    from cvlib.inference.decoding import ScoringDataset

    pre = meta["preprocessing"]
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg"))[:n]
    preset = eval_preset_from(pre)
    reduced = 0
    for f in files:
        with Image.open(folder / f) as im:
            full = im.size
            im.draft("RGB", (int(pre["resize_size"]),) * 2)
            reduced += im.size != full
    top1 = {}
    model = model.eval()
    for name, size in (("draft", int(pre["resize_size"])), ("full", 1 << 30)):
        ds = ScoringDataset(folder, files, preset, draft_size=size)
        x = torch.stack([ds[i].tensor for i in range(len(ds))])
        with torch.inference_mode():
            top1[name] = torch.cat([model(b) for b in x.split(64)]).argmax(1)
    return float((top1["draft"] == top1["full"]).float().mean()), reduced, len(files)


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


def top1_agreement(a: Path, b: Path) -> float:
    """Share of files whose top-1 class is the same in two scoring outputs."""
    from cvlib.inference.output import read_predictions

    x = read_predictions(a, columns=["path", "top1_index"]).set_index("path")["top1_index"]
    y = read_predictions(b, columns=["path", "top1_index"]).set_index("path")["top1_index"]
    common = x.index.intersection(y.index)
    return float((x[common] == y[common]).mean()) if len(common) else float("nan")


def _fmt(values: list[float]) -> str:
    return f"{statistics.median(values):7.1f}  (" + ", ".join(f"{v:.1f}" for v in values) + ")"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def _uptime() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=200, help="images per class in the training folder (6 classes; 20%% validation)")
    p.add_argument("--score-per-class", type=int, default=64, help="images per class in the folder scored end to end")
    p.add_argument("--score-scale", type=float, default=1.0, help="the scored JPEGs are this many times their crop's size")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--train-workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--loader-workers", type=int, default=1)
    p.add_argument("--settings", default="", help="more end-to-end settings, WORKERS:STREAMS,... (streams 0: the hint's choice)")
    p.add_argument("--sweep", action="store_true", help="also end to end over decode workers x OpenVINO streams")
    p.add_argument("--workdir", help="keep the data, model and outputs here (default: a temporary folder)")
    p.add_argument("--reuse", action="store_true", help="reuse the workdir's trained package (skip training)")
    p.add_argument("--reexport", action="store_true", help="with --reuse: export again (else reuse the export too)")
    p.add_argument("--export-config", default="{}", help="ExportConfig fields as JSON (default: the project's defaults)")
    p.add_argument("--serve-size", type=int, help="with --reuse: serve the trained weights at this input size instead (a package "
                   "copy whose preprocessing says so; ResNet-50 pools globally), exported and measured there")
    args = p.parse_args()

    from cvlib.data.ingest import build_manifest
    from cvlib.inference.engines import OpenVINOEngine, choose_engine
    from cvlib.inference.export import (
        FP32_FILE,
        INT8_FILE,
        Agreement,
        ExportRecord,
        _bf16_capable,
        export_package,
        validation_loader,
    )
    from cvlib.inference.loop import InferenceForward
    from cvlib.inference.options import ExportConfig
    from cvlib.models.precision import inference_dtype
    from cvlib.training.checkpoint import load_package

    work = Path(args.workdir or tempfile.mkdtemp(prefix="visionflow-engines-"))
    print(f"work folder: {work}; {os.cpu_count()} CPUs (shared: figures are noisy, read the ratios); {_uptime()}")
    package = work / "package"
    if args.reuse:
        classes = sorted(p.name for p in (work / "train").iterdir())
        model, meta = load_package(package)
        manifest = build_manifest(work / "train")[0]
        print(f"reusing {package} (trained at {meta['preprocessing']['image_size']} px)")
    else:
        classes = make_photos(work / "train", args.per_class, seed=0)
        print(f"training ResNet-50 at {args.image_size} px for {args.epochs} epochs with cvlib.training.fit on "
              f"{len(classes)} classes x {args.per_class} photo crops ...", flush=True)  # fmt: skip
        model, meta, manifest, result, secs = train_resnet50(work / "train", args.image_size, args.epochs, work, args.train_workers)
        print(f"  trained in {secs:.0f}s; best epoch {result.best_epoch}, val top-1 {result.best_val_top1:.4f}")
    if not (work / "score").exists():
        make_photos(work / "score", args.score_per_class, seed=1, scale=args.score_scale)
    if args.serve_size and args.serve_size != meta["preprocessing"]["image_size"]:
        from cvlib.training.checkpoint import save_package

        trained_at = meta["preprocessing"]["image_size"]
        ratio = meta["preprocessing"]["resize_size"] / trained_at
        meta = json.loads(json.dumps(meta))
        meta["preprocessing"].update(image_size=args.serve_size, resize_size=round(args.serve_size * ratio))
        package = work / f"package-{args.serve_size}"
        if not (package / "openvino" / "export.json").is_file():
            save_package(model, meta, package)
            args.reexport = True
        print(f"serving the weights trained at {trained_at} px at {args.serve_size} px: {package}")
    size = meta["preprocessing"]["image_size"]
    if args.reuse and not args.reexport:
        saved = json.loads((package / "openvino" / "export.json").read_text())
        record = ExportRecord(**(saved | {"candidates": [Agreement(**c) for c in saved["candidates"]]}))
    else:
        t0 = time.perf_counter()
        record = export_package(model, meta, work / "train", manifest, package / "openvino",
                                ExportConfig(**json.loads(args.export_config)))
        print(f"export + int8 calibration ({record.calibration_images} images) + agreement: {time.perf_counter() - t0:.0f}s; "
              f"quantization {record.quantization}")
    print(f"  validation: {record.val_images} images, fp32 top-1 {record.val_top1_fp32:.4f}")
    for c in record.candidates:
        print(f"  {c.precision:5s}: top-1 agreement {c.top1_agreement:.4f}, top-5 overlap {c.top5_agreement:.4f}, "
              f"val top-1 {c.val_top1:.4f} -> {'verified' if c.passed else 'rejected'}")  # fmt: skip
    print(f"  decision: {record.status} {record.precision or ''}: {record.reason}")

    choice = choose_engine("openvino", torch.device("cpu"), package)
    engine = OpenVINOEngine(choice.xml, int8=choice.int8, precision_hint=choice.precision_hint)
    print(f"OpenVINO engine: {choice.reason}; precision {engine.precision}, {engine.streams} streams, {engine.requests} requests")
    dev = torch.device("cpu")
    forward = InferenceForward(model, dev, inference_dtype("auto", dev), fuse=True)
    runs = {"torch": forward, f"openvino {engine.precision}": engine}
    fp32_xml = package / "openvino" / FP32_FILE
    if engine.precision == "int8" and fp32_xml.is_file():  # the floating-point IR beside it, bf16 where native
        bf16 = OpenVINOEngine(fp32_xml, precision_hint="bf16" if _bf16_capable() else "f32")
        runs[f"openvino {bf16.precision} IR"] = bf16
    int8_xml = package / "openvino" / INT8_FILE
    if engine.precision != "int8" and int8_xml.is_file():
        runs["openvino int8 (rejected)"] = OpenVINOEngine(int8_xml, int8=True)
    val = validation_loader(meta, work / "train", manifest, batch_size=32)
    batches = [b for b, _ in val][:4]
    while sum(len(b) for b in batches) < 128:
        batches = batches + batches
    print(f"\nmodel only, ResNet-50 at {size} px, batch 32, img/s (median (rounds)); {_uptime()}")
    mo = model_only(runs, batches, args.rounds)
    for name, values in mo.items():
        ratio = [o / t for o, t in zip(values, mo["torch"], strict=True)]
        print(f"  {name:26s} {_fmt(values)}  ratio to torch per round: {', '.join(f'{r:.2f}x' for r in ratio)}")
    print(f"  {_uptime()}")

    ms = decode_cost(work / "score", meta)
    n_score = len(classes) * args.score_per_class
    print("\ndecode for scoring, one worker, ms/image: " + ", ".join(f"{k} {v:.2f}" for k, v in ms.items()))
    print(f"  one core decodes {1000 / ms['item_draft']:.0f} img/s as scoring does (draft mode)")
    agree, reduced, checked = draft_agreement(model, meta, work / "score")
    print(f"  draft-mode against full decodes: {reduced} of {checked} files decoded smaller, fp32 top-1 agreement {agree:.4f}")

    env = dict(os.environ, PYTHONPATH=str(ROOT), VISIONFLOW_HOME=str(work / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1")  # fmt: skip
    packages = {"torch": ("torch", package), "openvino": ("openvino", package)}
    if "openvino int8 (rejected)" in runs:
        packages["openvino int8 (rejected)"] = ("openvino", forced_int8_package(package, work / "package-int8"))
    settings = [(args.loader_workers, 0)]
    if args.settings:
        settings += [tuple(int(x) for x in pair.split(":")) for pair in args.settings.split(",")]
    if args.sweep:
        settings += [(w, s) for w in (1, 2) for s in (1, 2) if (w, s) != (args.loader_workers, 0)]
    settings = list(dict.fromkeys(settings))
    e2e: dict[tuple, dict[str, list[float]]] = {}
    print(f"\nend to end, `visionflow score` on {n_score} JPEGs; {_uptime()}")
    try:
        for r in range(args.rounds):
            for workers, streams in settings:
                row = e2e.setdefault((workers, streams), {k: [] for k in packages})
                for name, (flag, pkg) in packages.items():
                    if name == "torch" and streams:
                        continue  # streams are OpenVINO's
                    out = work / "out" / f"{_slug(name)}-w{workers}-s{streams}-r{r}"
                    row[name].append(score_cli(work / "score", pkg, out, flag, env, workers, streams))
                    print(f"  round {r + 1}: {name:26s} workers {workers} streams {streams or 'auto'}: {row[name][-1]:.1f} img/s", flush=True)
    finally:
        subprocess.run([sys.executable, "-m", "flows.cli", "server", "stop"], cwd=ROOT, env=env, capture_output=True)
    print(f"\nend to end, img/s (median (rounds)); {_uptime()}")
    base = e2e[(args.loader_workers, 0)]["torch"]
    for (workers, streams), row in e2e.items():
        for name, values in row.items():
            if values:
                print(f"  {name:26s} loader-workers {workers} streams {streams or 'auto':4} {_fmt(values)}  "
                      f"ratio to torch: {statistics.median(values) / statistics.median(base):.2f}x")  # fmt: skip
    outs = {name: work / "out" / f"{_slug(name)}-w{args.loader_workers}-s0-r0" for name in packages}
    e2e_agreement = {name: top1_agreement(outs["torch"], o) for name, o in outs.items() if name != "torch"}
    for name, a in e2e_agreement.items():
        print(f"  top-1 agreement with torch on the scored folder: {name}: {a:.4f}")
    summary = {
        "image_size": size, "agreement": [c.__dict__ for c in record.candidates], "decision": record.status,
        "precision": record.precision, "model_only": mo, "decode_ms": ms, "draft_agreement": agree, "e2e_agreement": e2e_agreement,
        "end_to_end": {f"w{w}-s{s}": v for (w, s), v in e2e.items()},
    }  # fmt: skip
    (work / "engines.json").write_text(json.dumps(summary, indent=2))
    shutil.rmtree(work / "out", ignore_errors=True)
    print(f"\nfigures: {work / 'engines.json'}")


if __name__ == "__main__":
    main()
