"""``serve``: the run's exported model behind real HTTP on a free loopback port, started as a user starts it; answers
equal to ``predict``'s for the same files, one server batching concurrent clients, bad uploads answered with one line
of JSON while the server goes on, the web page driven in Debian's Chromium, Ctrl+C and SIGTERM."""

import contextlib
import csv
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, child_env, folder_fit, free_port, invoke

from project.commands import serve

CHROMIUM = "/usr/bin/chromium"  # Debian's package chromium (make install puts it there)


class Server:
    """``python -m project serve RUN --port P ARGS`` in a process group of its own, as a terminal runs it. Every one
    started is killed, with its group, when the module's tests end, whatever they did."""

    started: list["Server"] = []

    def __init__(self, run: Path, log: Path, *args: str):
        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "project", "serve", str(run), "--port", str(self.port), *args]
        with open(log, "w") as out:
            self.process = subprocess.Popen(command, cwd=ROOT, env=child_env(), stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)  # fmt: skip
        Server.started.append(self)
        deadline = time.monotonic() + 240  # exporting first, then a worker importing torch
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output
            if self.healthy():
                return
            time.sleep(0.2)
        self.process.kill()
        raise TimeoutError(self.output)

    def healthy(self) -> bool:
        """Whether GET /health answers ok: a worker has the model loaded."""
        try:
            return httpx.get(f"{self.url}/health").text == "ok"
        except httpx.TransportError:
            return False

    @property
    def output(self) -> str:
        return self.log.read_text()

    def post(self, *files: Path, field: str = serve.FIELD, **kwargs) -> httpx.Response:
        uploads = [(field, (f.name, f.read_bytes())) for f in files]
        return httpx.post(f"{self.url}/predict", files=uploads or None, timeout=60, **kwargs)

    def stop(self, signum: int, group: bool) -> int:
        """Sends ``signum`` to the server (or its whole group: a terminal's Ctrl+C) and waits for every process of
        the group to end."""
        os.killpg(self.process.pid, signum) if group else self.process.send_signal(signum)
        code = self.process.wait(60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.killpg(self.process.pid, 0)
            except ProcessLookupError:
                return code
            time.sleep(0.1)
        os.killpg(self.process.pid, signal.SIGKILL)
        raise AssertionError(f"processes of the server's group outlived it:\n{self.output}")


@pytest.fixture(scope="module", autouse=True)
def no_server_left():
    """A failed test leaves no server running, holding its port and memory."""
    yield
    for server in Server.started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def trained(image_folder, tmp_path_factory) -> Path:
    """A folder run (3 classes; its files PNG and JPEG, grayscale and RGB, 28x28 and 40x36) and its predictions.csv
    for a dozen of its files, every class in each row."""
    tmp = tmp_path_factory.mktemp("served")
    assert invoke(folder_fit(tmp, image_folder)).returncode == 0
    run = tmp / "logs" / "folder" / "version_0"
    files = tmp / "files"
    for path in sorted(image_folder.rglob("*.*"))[::25]:
        files.mkdir(exist_ok=True)
        shutil.copy(path, files / f"{path.parent.name}_{path.name}")
    predicted = invoke(["predict", "--config", str(run / "config.yaml"), "--ckpt_path", "best",
                        f"--data.predict_files={files}", "--predictions.top_k=3"])  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr
    return run


def predicted(run: Path) -> dict[str, list[tuple[str, float]]]:
    """``predict``'s answer per file name: (class, probability), most probable first."""
    path = next(run.glob("predict_*/predictions.csv"))
    with open(path) as f:
        rows = list(csv.DictReader(f))
    ranks = [("class_name", "probability"), ("class_2", "probability_2"), ("class_3", "probability_3")]
    return {Path(r["file"]).name: [(r[c], float(r[p])) for c, p in ranks] for r in rows}


def assert_same(answer: dict, expected: list[tuple[str, float]]) -> None:
    assert [t["class"] for t in answer["top_k"]] == [c for c, _ in expected]
    for t, (_, p) in zip(answer["top_k"], expected, strict=True):
        assert abs(t["probability"] - p) < 1e-5  # ONNX Runtime against PyTorch: rounding, 6 decimals each


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    """One server for the module: batches of up to 4 requests, waiting 50 ms for them to fill, uploads up to 1 MB.
    When the module ends it is stopped as systemd stops a service, and checked for a clean stop."""
    log = tmp_path_factory.mktemp("server") / "serve.log"
    running = Server(trained, log, "--max_batch_size", "4", "--batch_timeout", "0.05", "--max_upload_mb", "1")
    yield running
    # systemd's stop: SIGTERM to every process of the group, here with clients asking all the while
    image = next((trained.parents[2] / "files").iterdir())
    asking = True

    def ask() -> None:
        while asking:
            try:
                running.post(image)
            except httpx.TransportError:
                return

    clients = [threading.Thread(target=ask) for _ in range(4)]
    for client in clients:
        client.start()
    time.sleep(1)
    start = time.monotonic()
    assert running.stop(signal.SIGTERM, group=True) == 0
    asking = False
    for client in clients:
        client.join()
    assert time.monotonic() - start < 15, running.output
    assert "Stopped." in running.output and "Traceback" not in running.output, running.output


@pytest.mark.slow
def test_answers_equal_predict_one_and_many_files_a_request(server, trained):
    expected = predicted(trained)
    files = sorted((trained.parents[2] / "files").iterdir())
    assert {f.suffix for f in files} == {".png", ".jpg"}
    assert "has no export of" in server.output  # it exported first, with the parity check
    info = json.loads((trained / "export_0" / "model.json").read_text())
    assert info["parity"]["passed"] is True
    response = server.post(*files)
    assert response.status_code == 200, response.text
    answers = response.json()["predictions"]
    assert [a["file"] for a in answers] == [f.name for f in files]
    for answer in answers:
        assert_same(answer, expected[answer["file"]])
    for f in files[:3]:  # one file a request
        assert_same(server.post(f).json()["predictions"][0], expected[f.name])


@pytest.mark.slow
def test_concurrent_clients_each_get_their_own_answer_and_a_bad_one_fails_alone(server, trained):
    expected = predicted(trained)
    files = sorted((trained.parents[2] / "files").iterdir())
    bad = trained / "config.yaml"  # in the same batches as good requests: LitServe would fail them all together

    def ask(i: int) -> tuple[Path, httpx.Response]:
        f = bad if i % 5 == 4 else files[i % len(files)]
        return f, server.post(f)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, range(40)))
    for f, response in results:
        if f == bad:
            assert response.status_code == 400 and "config.yaml is not an image" in response.json()["error"]
        else:
            assert response.status_code == 200, response.text
            assert_same(response.json()["predictions"][0], expected[f.name])


@pytest.mark.slow
def test_bad_uploads_get_one_line_of_json_and_the_server_goes_on(server, trained, tmp_path):
    image = next((trained.parents[2] / "files").iterdir())
    empty, large, text = tmp_path / "empty.png", tmp_path / "large.png", tmp_path / "notes.png"
    empty.write_bytes(b"")
    large.write_bytes(image.read_bytes() + os.urandom(1_100_000))
    text.write_text("not an image\n")
    bomb = tmp_path / "huge.png"  # a PNG's header saying 12000x9000: what PIL reads of it, and the decoder never gets

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 12000, 9000, 8, 0, 0, 0, 0)  # 8-bit grayscale
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    bomb.write_bytes(png)
    url = f"{server.url}/predict"
    cases = [
        (server.post(text), 400, "notes.png is not an image torchvision can decode"),
        (server.post(image, empty), 400, "empty.png (file 2 of 2) is empty (0 bytes)"),
        (server.post(bomb), 413, "huge.png is 12000x9000 pixels; the server decodes images of at most 89 million"),
        (server.post(image, field="image"), 400, "no field 'file' in the form (it has 'image')"),
        (httpx.post(url, files={"file": (None, b"cat.png")}), 400, "field 'file' holds text"),
        (httpx.post(url), 400, "takes a multipart form (got no content type)"),
        (httpx.post(url, json={"file": "cat.png"}), 400, "takes a multipart form (got application/json)"),
        (httpx.post(url, content=b"", headers={"content-type": "multipart/form-data; boundary=x"}), 400,
         "no field 'file' in the form (it is empty)"),
        (httpx.post(url, content=b"junk", headers={"content-type": "multipart/form-data"}), 400,
         "the multipart form cannot be read (Missing boundary"),
        (httpx.post(url, content=b"junk", headers={"content-type": "multipart/form-data; boundary=x"}), 400,
         "the multipart form cannot be read"),
        (server.post(large), 413, "larger than the server's limit of 1 MB (--max_upload_mb)"),
        (httpx.get(url), 405, "Method Not Allowed"),
    ]  # fmt: skip
    for response, status, text in cases:
        assert response.status_code == status, response.text
        assert "\n" not in response.text.strip() and list(response.json()) == ["error"]
        assert text in response.json()["error"], response.text
    assert server.post(image).status_code == 200
    assert "Traceback" not in server.output and "Internal server error" not in server.output


@pytest.mark.slow
def test_web_page_in_chromium_shows_the_top_class_of_an_uploaded_file(server, trained, tmp_path):
    from playwright.sync_api import sync_playwright

    expected = predicted(trained)
    files = sorted((trained.parents[2] / "files").iterdir())[:2]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(server.url)
        assert "3 classes, 28x28" in page.inner_text(".facts")
        bad = trained / "config.yaml"
        page.set_input_files("#files", [str(files[0]), str(bad), str(files[1])])  # the page's own file input
        page.wait_for_function("document.querySelectorAll('.result .row, .result .error').length == 7")
        cards = page.locator(".result")
        assert cards.count() == 3
        for i, f in ((0, files[0]), (2, files[1])):
            assert cards.nth(i).locator(".file").inner_text() == f.name
            assert cards.nth(i).locator(".row .class").first.inner_text() == expected[f.name][0][0]
        assert "config.yaml is not an image" in cards.nth(1).locator(".error").inner_text()  # it alone
        shot = Path(os.environ.get("SERVE_SCREENSHOT", tmp_path / "page.png"))
        page.screenshot(path=shot, full_page=True)
        browser.close()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_an_export_directory_copied_elsewhere_serves_alone_and_sigterm_stops_it(server, trained, tmp_path):
    shipped = tmp_path / "shipped"  # what a user copies to the machine that serves: no run, no data
    shutil.copytree(trained / "export_0", shipped)
    running = Server(shipped, tmp_path / "serve.log", "--max_batch_size", "1", "--top_k", "2")
    f = next((trained.parents[2] / "files").iterdir())
    answer = running.post(f).json()["predictions"][0]
    assert [t["class"] for t in answer["top_k"]] == [c for c, _ in predicted(trained)[f.name][:2]]
    assert running.stop(signal.SIGTERM, group=False) == 0  # docker stop, kill PID: the main process alone
    assert "exporting" not in running.output and "Stopped." in running.output, running.output
    assert "Traceback" not in running.output


def workers(server: Server) -> list[int]:
    """The processes LitServe spawned to run the model, in the server's process group."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if os.getpgid(int(proc.name)) == server.process.pid and b"spawn_main" in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except (OSError, ProcessLookupError):  # ended meanwhile
            continue
    return found


@pytest.mark.slow
def test_torch_runtime_answers_the_same_a_killed_worker_is_replaced_and_ctrl_c_stops_all(trained, tmp_path):
    expected = predicted(trained)
    f = next((trained.parents[2] / "files").iterdir())
    running = Server(trained, tmp_path / "serve.log", "--runtime", "torch", "--max_batch_size", "1", "--timeout", "5")
    assert_same(running.post(f).json()["predictions"][0], expected[f.name])
    [worker] = workers(running)
    os.kill(worker, signal.SIGKILL)  # out of memory, say
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (workers(running) in ([], [worker]) or not running.healthy()):
        time.sleep(0.2)
    assert running.process.poll() is None and workers(running) not in ([], [worker]), running.output
    assert_same(running.post(f).json()["predictions"][0], expected[f.name])
    assert running.stop(signal.SIGINT, group=True) == 0  # Ctrl+C: the terminal signals the whole group
    assert "Stopped." in running.output and "Traceback" not in running.output, running.output


def test_export_of_finds_a_checked_export_of_the_checkpoint_wherever_the_run_moved(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")
    ckpt = run / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(b"weights")
    exports = []
    monkeypatch.setattr("project.commands.export.main", lambda argv: exports.append(argv) or Path("new"))

    def export(name: str, passed: bool = True, weights: bytes = b"weights") -> Path:
        directory = run / name
        directory.mkdir()
        info = {"checkpoint": "/elsewhere/last.ckpt", "parity": {"passed": passed},
                "checkpoint_sha256": hashlib.sha256(weights).hexdigest()}  # fmt: skip
        (directory / "model.json").write_text(json.dumps(info))
        return directory

    assert serve.export_of(run, "last") == Path("new") and len(exports) == 1  # no export yet
    good = export("export_0")  # made when the run was in /elsewhere
    assert serve.export_of(run, "last") == good and len(exports) == 1
    assert serve.export_of(good, "last") == good  # an export directory is served as it is
    export("export_1", passed=False)  # newer, but its parity check failed
    export("export_2", weights=b"other weights")  # of another checkpoint
    (run / "export_3").mkdir()  # an export interrupted
    assert serve.export_of(run, "last") == good and len(exports) == 1
    ckpt.write_bytes(b"trained on")  # the run trained again since: export again
    assert serve.export_of(run, "last") == Path("new") and len(exports) == 2
    assert exports[-1][-2:] == ["--ckpt_path", str(ckpt.resolve())]


def test_serve_refuses_an_address_it_cannot_bind_and_a_file_it_cannot_load(tmp_path):
    import socket

    export_dir = tmp_path / "export_0"
    export_dir.mkdir()
    info = {"classes": ["a", "b"], "input": {"shape": ["batch", 1, 28, 28]}, "output": {}}
    (export_dir / "model.json").write_text(json.dumps(info))
    (export_dir / "model.onnx").write_bytes(b"\x00" * 10)  # truncated
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        cases = [
            (["--host", "example.com"], 2, "--host example.com: give 127.0.0.1"),
            (["--port", "80"], 2, "--port 80: give a port from 1024 to 65535"),
            (["--port", str(busy)], 2, f"cannot listen on 127.0.0.1:{busy}"),
            (["--workers", "0"], 2, "--workers 0: give 1 or more"),
            (["--max_upload_mb", "0"], 2, "--max_upload_mb 0.0: give more than 0"),
            (["--batch_timeout", "2", "--timeout", "1"], 2, "--batch_timeout 2.0: give less than --timeout 1.0"),
            (["--port", str(free_port())], 1, "model.onnx cannot be loaded by onnx"),
        ]
        for args, code, text in cases:
            result = invoke(["serve", str(export_dir), *args])
            assert result.returncode == code and text in result.stderr, result.stderr
            assert "Traceback" not in result.stderr
    result = invoke(["serve", str(tmp_path), "--port", str(free_port())])
    assert result.returncode == 2 and "give a run directory" in result.stderr
    for text in ("", "{}", "[]", '{"classes": ["a"]}'):  # an export's model.json half written, or another file
        (export_dir / "model.json").write_text(text)
        result = invoke(["serve", str(export_dir), "--port", str(free_port())])
        assert result.returncode == 1 and "cannot be read as an export's model.json" in result.stderr, result.stderr
