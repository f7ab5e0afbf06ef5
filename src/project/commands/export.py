"""``python -m project export RUN``: a run's best checkpoint (or ``--ckpt_path``) as an ONNX model (torch.onnx, dynamo
exporter) and a torch.export program (``.pt2``), checked against PyTorch on real test images.

Both are the trained module itself: ``uint8`` images ``(N, C, H, W)`` at the training size in, any ``N``, one logit per
class out; the normalisation the run trained with is inside the graph (the module's buffers), resizing is not.
``model.json`` beside them names the classes, the input shape and what the output means. Written to
``RUN/export_<k>/`` (the run itself is not changed) or ``--out``.

    python -m project export logs/fashion_mnist_cnn/version_0
"""

import argparse
import json
import shutil
from pathlib import Path

import torch
import yaml
from torch import nn

from project.errors import ConfigError, ExportError, first_line
from project.files import digest

FILES = ("model.onnx", "model.pt2", "model.json")


def load_run(run: Path, ckpt: str, overrides: list[str]):
    """The run's model with the checkpoint's weights (eval mode), its data module set up for test, and the checkpoint's
    path. ``overrides``: ``--KEY VALUE`` arguments over the run's config (another ``--data.source.root`` or
    ``--data.data_dir`` where the data is now)."""
    import logging

    from project.cli import CLI, check_fits
    from project.runs import checkpoint, read_checkpoint

    config_path = run / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"export {run}: {config_path} does not exist; give a run directory under logs/.")
    path = checkpoint(run, ckpt)
    checkpoint = read_checkpoint(path)
    config = yaml.safe_load(config_path.read_text())
    for key in ("ckpt_path", "weights_only"):  # arguments of fit, not of the model and data
        config.pop(key, None)
    # the Trainer's notes on seeds and accelerators are about training, not this command
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    cli = CLI(["--config", yaml.safe_dump(config), *overrides], command="export")
    model, data = cli.model, cli.datamodule
    check_fits(path, checkpoint, model)
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    data.prepare_data()
    data.setup("test")
    return model, data, path


def test_images(data, n: int) -> torch.Tensor:
    """The first ``n`` images of the data module's test split, as its test loader serves them."""
    images, count = [], 0
    for x, _ in data.test_dataloader():
        images.append(x)
        count += len(x)
        if count >= n:
            break
    return torch.cat(images)[:n]


def parity(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, int]:
    """Largest absolute logit difference, and on how many images the top-1 class agrees."""
    return (other - reference).abs().max().item(), int((other.argmax(1) == reference.argmax(1)).sum())


def export(model: nn.Module, example: torch.Tensor, out: Path) -> dict[str, Path]:
    """``model.onnx`` and ``model.pt2`` in ``out``, with a batch dimension of any size."""
    import warnings

    batch = torch.export.Dim("batch", min=1)
    files = {"onnx": out / FILES[0], "pt2": out / FILES[1]}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporters' notes on internals a user of the template cannot change
            program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
            torch.export.save(program, files["pt2"])
            torch.onnx.export(
                model, (example,), files["onnx"], dynamo=True, dynamic_shapes=({0: batch},),
                input_names=["images"], output_names=["logits"], verbose=False, external_data=False,
            )  # fmt: skip
    except Exception as err:  # torch.export and ONNX raise many types for a net they cannot trace
        raise ExportError(f"the net cannot be exported ({type(err).__name__}: {first_line(err)}).") from None
    return files


def main(argv: list[str]) -> Path:
    """``argv``: ``export`` and its arguments. Returns the directory written."""
    parser = argparse.ArgumentParser(
        prog="python -m project export",
        description=__doc__.split("\n\n")[0],
        usage="python -m project export RUN_DIR [--ckpt_path best|last|FILE] [--out DIR] [--atol X] [--images N] "
        "[--KEY VALUE ...]",
        epilog="--KEY VALUE arguments change the run's config, e.g. --data.source.root where the images are now.",
        allow_abbrev=False,
    )
    parser.add_argument("run", type=Path, help="a run directory: logs/<name>/version_<n>")
    parser.add_argument("--ckpt_path", default="best", help="best (default), last, or a .ckpt file")
    parser.add_argument("--out", type=Path, help="the directory to write (default: RUN_DIR/export_<k>)")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest logit difference allowed (default 1e-4)")
    parser.add_argument("--images", type=int, default=256, help="test images the parity check runs on (default 256)")
    args, overrides = parser.parse_known_args(argv[1:])
    if args.images < 1 or args.atol < 0:
        raise ConfigError("export: --images must be 1 or more and --atol 0 or more.")
    if args.out is not None and (there := [f for f in FILES if (args.out / f).exists()]):
        raise ConfigError(f"export --out {args.out}: {', '.join(there)} exist there already; choose another directory, "
                          "or move them away first.")  # fmt: skip
    model, data, ckpt = load_run(args.run, args.ckpt_path, overrides)
    images = test_images(data, args.images)
    claimed = args.out is None
    if claimed:
        from project.runs import claim

        args.out = args.run / claim(args.run, "export")
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        files = export(model, images[:2], args.out)
        report = check(model, images, files)
    except BaseException:  # Ctrl+C or an error: no unchecked model files are left to be shipped
        for name in FILES:
            (args.out / name).unlink(missing_ok=True)
        if claimed:  # this command's own new directory
            shutil.rmtree(args.out, ignore_errors=True)
        raise
    failed = [name for name, (diff, agree) in report.items() if diff > args.atol or agree < len(images)]
    shape, classes = list(model.hparams.in_shape), list(model.hparams.classes)
    output = {"name": "logits", "shape": ["batch", len(classes)], "meaning": "one logit per class"}
    if float(getattr(model, "temperature", 1)) != 1:  # calibrated: the graph divides by it already
        output["meaning"] += f", divided by the calibration temperature {float(model.temperature):.4f} (in the graph)"
        output["temperature"] = float(model.temperature)
    if model.hparams.get("multilabel"):  # the classes given: those whose probability reaches the threshold
        output |= {"meaning": "one logit per class: its sigmoid is the class's probability (multi-label)",
                   "threshold": float(model.threshold)}  # fmt: skip
    info = {
        "classes": classes,
        "input": {
            "name": "images",
            "shape": ["batch", *shape],
            "dtype": "uint8",
            "layout": f"NCHW, {'RGB' if shape[0] == 3 else 'grayscale'}, 0-255",
        },
        "output": output,
        "resize": f"images must be resized to {shape[1]}x{shape[2]} (height x width) before they go in, as in "
        "training: turned upright by their EXIF orientation, bilinear with antialiasing",
        "normalisation (inside the model)": {
            "mean": model.normalize.mean.tolist(),
            "std": model.normalize.std.tolist(),
        },
        # test-time augmentation averages the net over several views; the exported model is the net, one view
        "test-time augmentation": "none: run the model on flipped or shifted copies and average the logits for it",
        "checkpoint": str(ckpt.absolute()),
        "checkpoint_sha256": digest(ckpt),  # which checkpoint this is, wherever the run has moved since
        "parity": {
            "images": f"the first {len(images)} test images of {type(data).__name__}",
            **report,
            "tolerance": args.atol,
            "passed": not failed,
        },
    }
    (args.out / FILES[2]).write_text(json.dumps(info, indent=2) + "\n")
    print(f"Exported {ckpt} to {args.out}: model.onnx, model.pt2, model.json")
    if model.hparams.get("tta", "none") != "none":
        print(f"note: model.tta={model.hparams.tta} is not part of the exported model, which sees each image once.")
    print(f"Parity on {len(images)} test images, logits against PyTorch (tolerance {args.atol:g}):")
    for name, (diff, agree) in report.items():
        print(f"  {name:<11} max |difference| {diff:.2e}   top-1 agreement {agree}/{len(images)}")
    if failed:
        raise ExportError(
            f"{' and '.join(failed)} in {args.out} do not compute what PyTorch computes within --atol {args.atol:g} "
            "(see the table above): do not ship them. A larger --atol accepts the difference, if it is only rounding."
        )
    return args.out


def check(model: nn.Module, images: torch.Tensor, files: dict[str, Path]) -> dict[str, tuple[float, int]]:
    """Each exported file against PyTorch on ``images``, run as one batch and one image at a time."""
    import onnxruntime

    with torch.no_grad():
        reference = model(images)
    session = onnxruntime.InferenceSession(str(files["onnx"]), providers=["CPUExecutionProvider"])
    program = torch.export.load(files["pt2"]).module()
    runs = {
        "model.onnx": lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0]),
        "model.pt2": lambda x: program(x).detach(),
    }
    report = {}
    for name, run in runs.items():
        batched = run(images)
        single = torch.cat([run(image[None]) for image in images[:8]])
        diff, agree = parity(reference, batched)
        report[name] = (max(diff, parity(reference[:8], single)[0]), agree)
    return report
