"""Two nodes x one process on loopback through torchrun (c10d rendezvous, gloo), against one process."""

import contextlib
import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import ROOT, child_env, fit_args, forked, free_port

pytestmark = pytest.mark.slow


def _args(tmp_path, fashion_dir, name: str, batch_size: int) -> list[str]:
    dump = json.dumps({"class_path": "helpers.DumpMetrics", "init_args": {"directory": str(tmp_path / name)}})
    return fit_args(
        tmp_path / name, fashion_dir, "--data.val_size=58000", f"--data.batch_size={batch_size}",
        "--data.eval_batch_size=250", "--trainer.limit_train_batches=1.0", "--trainer.limit_val_batches=4",
        "--trainer.limit_test_batches=4", "--trainer.accelerator=cpu", f"--trainer.callbacks+={dump}",
    )  # fmt: skip


def test_two_nodes_with_torchrun_match_one_process_of_the_same_global_batch(tmp_path, fashion_dir):
    env = child_env(PYTHONPATH=str(ROOT / "tests"))
    port = free_port()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=test"]  # fmt: skip
    two_nodes = [*_args(tmp_path, fashion_dir, "two_nodes", 50), "--trainer.num_nodes=2", "--trainer.devices=1",
                 "--trainer.strategy=ddp"]  # fmt: skip
    logs = [tmp_path / f"node{rank}.log" for rank in range(2)]
    nodes = [
        subprocess.Popen([*torchrun, f"--node_rank={rank}", "-m", "project", *two_nodes], cwd=ROOT, env=env,
                         stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        for rank, log in enumerate(logs)
    ]  # fmt: skip
    single = forked(_args(tmp_path, fashion_dir, "one_process", 100), tmp_path / "one_process.log")
    try:
        codes = [node.wait(timeout=180) for node in nodes]
    except subprocess.TimeoutExpired:  # a node that waits for the other forever: both outputs, then both stopped
        for node in nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)
        codes = None
    outputs = [log.read_text() for log in logs]
    tails = "\n".join(f"node {rank}:\n{output[-3000:]}" for rank, output in enumerate(outputs))
    assert codes == [0, 0], f"exit codes {codes}\n{tails}"
    assert single.returncode == 0, single.stdout[-3000:]

    ranks = [json.loads((tmp_path / "two_nodes" / f"rank{r}.json").read_text()) for r in range(2)]
    one = json.loads((tmp_path / "one_process" / "rank0.json").read_text())
    print(f"two nodes: {ranks}\none process: {one}")  # the figures, with pytest -s
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2 and one["world_size"] == 1
    for key in ("val/acc", "val/loss", "val/f1", "val/acc_best"):
        assert ranks[0][key] == ranks[1][key], key  # both ranks hold the synced value
    # 2000 training images: 20 steps of 2 x 50 images, as the single process takes 20 steps of 100
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == one["global_step"] == 20
    assert abs(ranks[0]["val/acc"] - one["val/acc"]) < 0.1
    # only rank 0 wrote a run: one version directory, one set of checkpoints
    runs = list((tmp_path / "two_nodes" / "logs").glob("*/version_*"))
    assert [r.name for r in runs] == ["version_0"]
    assert sorted(p.name for p in (runs[0] / "checkpoints").iterdir()) == ["best-epoch000.ckpt", "last.ckpt"]
    assert "test/acc" in outputs[0]
