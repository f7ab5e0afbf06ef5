"""Requests per second and latency of ``python -m project serve`` on loopback, against ONNX Runtime called directly in
one process on the same images: one client sending one image a request, then 8 clients at once, each in its own
thread with a keep-alive connection; the server with requests batched (``--max_batch_size 8``) and without (1).

The images are 28x28 PNGs of the Fashion-MNIST test set; the client runs on the same machine as the server, as
loopback implies, and takes its share of the cores.

    python -m project fit          # the default run, or any other
    python benchmarks/serve.py logs/fashion_mnist_cnn/version_0      # about a minute on 2 CPU cores
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import onnxruntime
from torchvision.io import write_png

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from project.commands.serve import FIELD, export_of  # noqa: E402
from project.data import registry  # noqa: E402
from project.images import decode_bytes  # noqa: E402


def timed(call, n: int, clients: int) -> tuple[float, list[float]]:
    """``call(client, i)`` ``n`` times a client, from ``clients`` threads at once: requests a second, latencies (s)."""
    latencies: list[float] = []
    lock = threading.Lock()

    def work(client: int) -> None:
        mine = []
        for i in range(n):
            start = time.perf_counter()
            call(client, i)
            mine.append(time.perf_counter() - start)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=work, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(latencies) / (time.perf_counter() - start), latencies


def row(name: str, rate: float, latencies: list[float]) -> str:
    p50, p99 = (statistics.quantiles(latencies, n=100)[k] * 1000 for k in (49, 98))
    return f"| {name} | {rate:,.0f} | {p50:.2f} | {p99:.2f} |"


def served(export: Path, files: list[bytes], args: list[str], n: int) -> list[tuple[int, float, list[float]]]:
    """Starts the server with ``args``, measures 1 and 8 clients, stops it."""
    port = 8123
    server = subprocess.Popen([sys.executable, "-m", "project", "serve", str(export), "--port", str(port), *args],
                              stdout=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if server.poll() is not None:  # port 8123 taken, say: its one-line error went to the terminal
                raise SystemExit(f"serve ended with exit code {server.returncode} before it was ready.")
            try:
                if httpx.get(f"{url}/health").text == "ok":
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        results = []
        for clients in (1, 8):
            sessions = [httpx.Client(base_url=url, timeout=60) for _ in range(clients)]

            def post(client: int, i: int, sessions=sessions) -> None:
                response = sessions[client].post("/predict", files={FIELD: ("image.png", files[i % len(files)])})
                response.raise_for_status()

            timed(post, 20, clients)  # warm-up: connections, the worker's first runs
            results.append((clients, *timed(post, n, clients)))
            for s in sessions:
                s.close()
        return results
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run directory (exported first if it has no export) or an export")
    parser.add_argument("--requests", type=int, default=300, help="requests per client (default 300)")
    args = parser.parse_args()
    export = export_of(args.run, "best")
    x, _ = registry.load("fashion_mnist", ROOT / "data", train=False)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(64):
            write_png(x[i], f"{tmp}/{i}.png")
        files = [Path(f"{tmp}/{i}.png").read_bytes() for i in range(64)]
    c, h, w = json.loads((export / "model.json").read_text())["input"]["shape"][1:]
    session = onnxruntime.InferenceSession(str(export / "model.onnx"), providers=["CPUExecutionProvider"])
    arrays = [decode_bytes(f, "image", (h, w), c)[None].numpy() for f in files]

    def direct(client: int, i: int) -> None:
        session.run(None, {"images": arrays[i % len(arrays)]})

    def decoded(client: int, i: int) -> None:
        session.run(None, {"images": decode_bytes(files[i % len(files)], "image", (h, w), c)[None].numpy()})

    lines = ["| how | clients | requests/s | p50 ms | p99 ms |", "|---|---|---|---|---|"]
    for name, call in (("onnxruntime directly, one image a call", direct),
                       ("onnxruntime directly, decoding the PNG too", decoded)):  # fmt: skip
        for clients in (1, 8):
            timed(call, 20, clients)
            rate, latencies = timed(call, args.requests, clients)
            lines.append(row(f"{name} | {clients}", rate, latencies))
    for batch in (8, 1):
        for clients, rate, latencies in served(export, files, ["--max_batch_size", str(batch)], args.requests):
            lines.append(row(f"serve --max_batch_size {batch} | {clients}", rate, latencies))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
