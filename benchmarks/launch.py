"""Seconds from process launch to the first training step, the template's ``fit`` against a plain PyTorch script
that loads the same data, and where the template's seconds go:

    python benchmarks/launch.py            # about 1 minute

Both are started as new processes, alternately, ``--rounds`` times; each reports the wall-clock time at which its
first training step begins (the template through a callback that also stamps each phase before it).
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PLAIN = """
import json, sys, time
import torch, torchvision
stamps = {"imports": time.time()}
train = torchvision.datasets.FashionMNIST(sys.argv[1], train=True, download=False)
x, y = train.data.unsqueeze(1), train.targets
stamps["data"] = time.time()
net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
optimizer = torch.optim.AdamW(net.parameters())
idx = torch.randperm(len(y))[:128]
stamps["first step"] = time.time()
loss = torch.nn.functional.cross_entropy(net((x[idx].float() - 72.9) / 90.0), y[idx])
loss.backward(); optimizer.step()
print(json.dumps(stamps))
"""


def run(command: list[str], stamps_file: Path | None = None) -> dict[str, float]:
    launched = time.time()
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    stamps = json.loads(stamps_file.read_text() if stamps_file else out.stdout.strip().splitlines()[-1])
    return {phase: t - launched for phase, t in stamps.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results = {"plain": [], "template": []}
    with tempfile.TemporaryDirectory() as tmp:
        stamps = Path(tmp) / "stamps.json"
        clock = json.dumps({"class_path": "clocks.LaunchClock", "init_args": {"path": str(stamps)}})
        template = [sys.executable, "-c", "import sys; sys.path.insert(0, 'benchmarks'); "
                    "from project.__main__ import main; main()", "fit", f"--data.data_dir={args.data_dir}",
                    f"--trainer.logger.init_args.save_dir={tmp}", "--trainer.max_steps=1",
                    "--trainer.enable_progress_bar=false", f"--trainer.callbacks+={clock}"]  # fmt: skip
        for _ in range(args.rounds):
            results["plain"].append(run([sys.executable, "-c", PLAIN, args.data_dir]))
            results["template"].append(run(template, stamps))
    print(f"\n| seconds from launch (median of {args.rounds}) | reached at |\n|---|---|")
    for name, rounds in results.items():
        for phase in rounds[0]:
            print(f"| {name}: {phase} | {statistics.median(r[phase] for r in rounds):.2f} |")
    gap = statistics.median(r["first step"] for r in results["template"]) - statistics.median(
        r["first step"] for r in results["plain"]
    )
    print(f"\nthe template's first step comes {gap:.2f} s after the plain script's")


if __name__ == "__main__":
    main()
