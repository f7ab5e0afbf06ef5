"""compare, lr-plot, and what a TensorBoard server shows of a run."""

import csv
import functools
import json
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml
from conftest import ROOT, TINY, cli, fit_args, forked, free_port, invoke, tiny_experiment

from project.commands.compare import finished
from project.commands.experiments import resolve
from project.commands.lr_plot import schedule

PNG = b"\x89PNG\r\n\x1a\n"


@functools.cache
def curve(config: str, *args: str) -> tuple[list[float], list[float]]:
    return schedule([f"--config={ROOT / config}", *args])


def lr_at(config: str, epoch: float) -> float:
    x, lr = curve(config)
    return lr[min(range(len(x)), key=lambda i: abs(x[i] - epoch))]


@pytest.mark.slow
def test_lr_schedules_without_training():
    base = 0.003  # the default config's AdamW learning rate
    assert lr_at("configs/schedulers/step.yaml", 2.9) == pytest.approx(base)
    assert lr_at("configs/schedulers/step.yaml", 3.0) == pytest.approx(base / 2)
    assert lr_at("configs/schedulers/multistep.yaml", 4.5) == pytest.approx(base)
    assert lr_at("configs/schedulers/multistep.yaml", 5.5) == pytest.approx(base / 10)
    restarts = "configs/schedulers/cosine_warm_restarts.yaml"
    assert lr_at(restarts, 1.0) < base and lr_at(restarts, 2.0) == pytest.approx(base)  # T_0 = 2: a restart
    x, lr = curve("configs/schedulers/onecycle.yaml")
    assert len(lr) == 10 * (55000 // 128)  # one point per optimizer step of the default's 10 epochs
    # one learning rate: one cycle peaks at the optimizer's, and follows it when it changes
    assert max(lr) == pytest.approx(base, rel=1e-3) and x[lr.index(max(lr))] == pytest.approx(10 * 0.3, abs=0.05)
    assert lr[-1] < 1e-5
    _, lr = curve("configs/schedulers/onecycle.yaml", "--model.optimizer.init_args.lr=0.02")
    assert max(lr) == pytest.approx(0.02, rel=1e-3)
    plateau = "configs/schedulers/plateau.yaml"
    assert lr_at(plateau, 2.5) == pytest.approx(base) and lr_at(plateau, 7.5) < base


@pytest.mark.slow
def test_lr_plot_writes_a_png(tmp_path):
    out = tmp_path / "lr.png"
    result = invoke(["lr-plot", str(ROOT / "configs/experiments/schedulers"), f"--out={out}"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.read_bytes().startswith(PNG) and f"Wrote {out}" in result.stdout


@pytest.mark.slow
def test_compare_runs_variants_reports_failures_and_reuses_finished_runs(tmp_path, fashion_dir):
    experiment = tiny_experiment(tmp_path, fashion_dir)
    (experiment / "mlp.yaml").unlink()  # one variant that trains (compare --seeds in test_tricks trains two)
    (experiment / "broken.yaml").write_text("model:\n  net:\n    class_path: project.models.Nope\n")
    logs = tmp_path / "logs"
    args = ["compare", str(experiment), f"--logs={logs}", "--", *TINY, "--trainer.max_epochs=2"]
    result = forked(args, tmp_path / "compare.log")
    assert result.returncode == 1  # a variant failed, and says so
    # a variant whose config cannot work fails before it trains, with the reason
    assert "[1/2] tiny/broken: FAILED, variant broken would not start: model.net" in result.stdout
    assert "Nope" in result.stdout
    with open(logs / "tiny" / "comparison.csv") as f:
        rows = {row["run"]: row for row in csv.DictReader(f)}
    assert rows["broken"]["status"].startswith("failed, variant broken would not start")
    row = rows["linear"]
    assert row["status"] == "ok" and row["epochs"] == "2" and int(row["params"]) == 7850
    assert 0 < float(row["test acc"]) <= 1 and 0 <= int(row["best epoch"]) <= 1
    assert "| linear | ok |" in (logs / "tiny" / "comparison.md").read_text()
    assert (logs / "tiny" / "curves.png").read_bytes().startswith(PNG)

    again = forked(args, tmp_path / "again.log")
    assert "[2/2] tiny/linear: reusing" in again.stdout
    assert sorted(p.name for p in (logs / "tiny" / "linear").iterdir()) == ["version_0"]
    # a finished run is what would train now only if its config is: other arguments after -- train anew
    fit = [f"--config={experiment / 'base.yaml'}", f"--config={experiment / 'linear.yaml'}", *TINY]
    same = yaml.safe_load(resolve([*fit, "--trainer.max_epochs=2"], "linear"))
    other = yaml.safe_load(resolve([*fit, "--trainer.max_epochs=3"], "linear"))
    assert finished(logs / "tiny" / "linear", same) == logs / "tiny" / "linear" / "version_0"
    assert finished(logs / "tiny" / "linear", other) is None


def _get(url: str, data: dict | None = None):
    body = json.dumps(data).encode() if data is not None else None
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"} if body else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_tensorboard_serves_the_runs_story(tmp_path, fashion_dir):
    cli(fit_args(tmp_path, fashion_dir, "--trainer.max_epochs=2", "--trainer.log_every_n_steps=1"))
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", f"--logdir={tmp_path / 'logs'}", "--host=127.0.0.1",
         f"--port={port}", "--reload_interval=1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}/data/plugin"
        deadline = time.monotonic() + 60
        while True:
            try:
                scalars = _get(f"{base}/scalars/tags")
                if scalars:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "tensorboard did not come up"
            time.sleep(0.5)
        run_name = "fashion_mnist_cnn/version_0"
        expected = {"train/loss_step", "train/loss_epoch", "train/acc", "val/loss", "val/acc", "val/acc_best", "val/f1",
                    "val/recall", "val/acc_top5", "test/loss", "test/acc", "test/f1", "test/recall", "test/ece",
                    "lr-AdamW", "model/params"}  # fmt: skip
        assert expected <= set(scalars[run_name])
        images = {"test/confusion_matrix", "test/misclassified", "test/reliability"}
        assert set(_get(f"{base}/images/tags")[run_name]) == images
        texts = {"model/summary/text_summary", "test/per_class/text_summary"}
        assert set(_get(f"{base}/text/tags")[run_name]) == texts
        layout = json.dumps(_get(f"{base}/custom_scalars/layout"))
        assert '"train/loss_epoch", "val/loss"' in layout and '"train/acc", "val/acc"' in layout
        assert _get(f"{base}/graphs/info")[run_name]["run_graph"]
        experiment = _get(f"{base}/hparams/experiment", {"experimentName": ""})
        metrics = {m["name"]["tag"] for m in experiment["metricInfos"]}
        assert {"test/acc", "val/acc_best"} <= metrics
        hparams = {h["name"] for h in experiment["hparamInfos"]}
        assert {"net/class_path", "optimizer/init_args/lr", "batch_size", "source"} <= hparams
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_make_tensorboard_binds_to_loopback():
    makefile = (ROOT / "Makefile").read_text()
    assert "HOST ?= 127.0.0.1" in makefile and "--host $(HOST)" in makefile


def test_config_stems_of_any_command_line():
    from project.configs import config_stems

    assert config_stems([]) == []
    assert config_stems(["--config", "a/b.yaml", "--x=1", "-c=c.yaml"]) == ["b", "c"]
