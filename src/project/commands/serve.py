"""``python -m project serve RUN``: the run's exported model behind HTTP with LitServe: ``POST /predict`` (images as
multipart fields named ``file``) answers each image's most probable classes as JSON, ``GET /`` is a web page to drop
images on, ``GET /health`` says ``ok`` once a worker has loaded the model.

The model is the run's export (``RUN/export_<k>``, made now with its parity check when the run has none of this
checkpoint), or ``RUN`` itself when it is an export directory; images are decoded, turned to the training channels and
resized to the training size by the function ``predict`` uses, so both give the same numbers.

    python -m project serve logs/fashion_mnist_cnn/version_0
    curl -F file=@shoe.png http://127.0.0.1:8000/predict
"""

import argparse
import asyncio
import html
import io
import json
import logging
import os
import signal
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import litserve as ls
import torch
from PIL import Image

from project.errors import ConfigError, DataError, ExportError, ProjectError, first_line
from project.images import decode_bytes

FIELD = "file"  # the multipart field each image comes in, repeated for several
USAGE = f"send each image as a multipart field named {FIELD!r}, e.g. curl -F {FIELD}=@image.png URL/predict"
AGAIN = "export the run again: python -m project export RUN."  # what mends an export that cannot be served
# the largest image decoded: PIL's guard against decompression bombs (a 400 KB PNG can hold 400 million pixels, GBs
# decoded)
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
# the addresses LitServe 0.2.19 binds to (LitServer.run refuses others)
HOSTS = ("127.0.0.1", "0.0.0.0", "::")


@dataclass
class Upload:
    """One request as a worker decoded it: its images ``uint8 (N, C, H, W)`` and their file names, or why it cannot
    be answered (``error``, with its HTTP ``status``)."""

    names: list[str]
    images: torch.Tensor | None = None
    probabilities: torch.Tensor | None = None  # (N, classes), once the model has run
    error: str = ""
    status: int = 400


class ImageAPI(ls.LitAPI):
    """Serves an export directory with ``runtime`` (onnx, torch): the ``top_k`` classes of each image."""

    def __init__(self, directory: Path, runtime: str, top_k: int, **kwargs):
        super().__init__(**kwargs)
        self.directory, self.runtime, self.top_k = directory, runtime, top_k

    def setup(self, device: str) -> None:
        # Ctrl+C, and systemd's stop (SIGTERM), reach every process of the group; the main process then stops the
        # others in turn. A worker ignores SIGINT, which would be a traceback from inside LitServe's loop, and leaves a
        # second after SIGTERM, time to answer the requests it holds, which the HTTP process waits for.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, lambda *_: threading.Timer(1, os._exit, (0,)).start())
        self.info = model_info(self.directory)
        self.model = ready(self.directory, self.info, self.runtime, device)

    def decode_request(self, request) -> Upload:
        """The form's images, decoded as ``predict`` decodes files; never raises, since LitServe fails every
        request of a batch when one request's decoding raises (litserve 0.2.19, BatchedLoop)."""
        uploads = request.getlist(FIELD)
        if not uploads:
            given = ", ".join(repr(k) for k in dict.fromkeys(request.keys()))
            return Upload([], error=f"no field {FIELD!r} in the form ({f'it has {given}' if given else 'it is empty'}"
                                    f"): {USAGE}.")  # fmt: skip
        if texts := [u for u in uploads if isinstance(u, str)]:
            return Upload([], error=f"field {FIELD!r} holds text ({texts[0][:40]!r}), not a file: give a file's "
                                    f"contents, e.g. curl -F {FIELD}=@image.png (with the @).")  # fmt: skip
        c, h, w = self.info["input"]["shape"][1:]
        names = [u.filename or f"upload {i + 1}" for i, u in enumerate(uploads)]
        images = []
        for i, (upload, name) in enumerate(zip(uploads, names, strict=True)):
            where = f"{name} (file {i + 1} of {len(uploads)})" if len(uploads) > 1 else name
            raw = upload.file.read()
            if (size := pixels(raw)) and size[0] * size[1] > MAX_PIXELS:
                return Upload(names, error=f"{where} is {size[0]}x{size[1]} pixels; the server decodes images of at "
                                           f"most {MAX_PIXELS / 1e6:.0f} million pixels.", status=413)  # fmt: skip
            try:
                images.append(decode_bytes(raw, where, (h, w), c))
            except DataError as err:
                return Upload(names, error=str(err))
        return Upload(names, torch.stack(images))

    def predict(self, x):
        """Every image of the requests (a batch of them when ``max_batch_size`` > 1) in one run of the model."""
        uploads = x if self.max_batch_size > 1 else [x]
        good = [u for u in uploads if not u.error]
        if good:
            logits = self.model(torch.cat([u.images for u in good]))
            multilabel = "threshold" in self.info["output"]
            probabilities = torch.sigmoid(logits) if multilabel else logits.softmax(1)
            for u, p in zip(good, probabilities.split([len(u.images) for u in good]), strict=True):
                u.probabilities = p
        return uploads if self.max_batch_size > 1 else uploads[0]

    def encode_response(self, output: Upload):
        from fastapi.responses import JSONResponse

        if output.error:
            return JSONResponse({"error": output.error}, status_code=output.status)
        classes, threshold = self.info["classes"], self.info["output"].get("threshold")
        k = min(self.top_k, len(classes))
        answers = []
        for name, p in zip(output.names, output.probabilities, strict=True):
            top_p, top_i = p.topk(k)
            top = zip(top_p.tolist(), top_i.tolist(), strict=True)
            ranked = [{"class": classes[i], "index": i, "probability": round(q, 6)} for q, i in top]
            answer = {"file": name, "top_k": ranked}
            if threshold is not None:  # multi-label: the classes given, as predictions.csv's labels column
                answer["labels"] = [c for c, q in zip(classes, p.tolist(), strict=True) if q >= threshold]
            answers.append(answer)
        return {"predictions": answers}


def pixels(raw: bytes) -> tuple[int, int] | None:
    """An image's width and height from its header (PIL reads no pixels for it), or None where PIL cannot tell."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked against MAX_PIXELS
            with Image.open(io.BytesIO(raw)) as image:
                return image.size
    except Image.DecompressionBombError:  # over twice PIL's limit: PIL will not say how large
        return (MAX_PIXELS + 1, 1)
    except (OSError, ValueError):  # not an image PIL knows; torchvision's decoder will say what it is
        return None


def model_info(directory: Path) -> dict:
    """The export's ``model.json``. Raises ExportError if it is missing, or is not an export's."""
    path = directory / "model.json"
    try:
        info = json.loads(path.read_text())
        if not (info.get("classes") and len(info["input"]["shape"]) == 4 and "output" in info):
            raise ValueError("it names no classes, input shape or output")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        why = err.strerror if isinstance(err, OSError) else f"{type(err).__name__}: {err}"
        raise ExportError(f"{path} cannot be read as an export's model.json ({why}); {AGAIN}") from None
    return info


def ready(directory: Path, info: dict, runtime: str, device: str = "cpu"):
    """The export's model (:func:`load`), run once on an image of ``model.json``'s input shape (its first run is the
    slow one). Raises ExportError unless it answers one logit per class of ``model.json``'s classes."""
    model, shape = load(directory, runtime, device), info["input"]["shape"][1:]
    try:
        logits = model(torch.zeros(1, *shape, dtype=torch.uint8))
    except Exception as err:  # the runtime's own types, for an input the graph does not take
        raise ExportError(f"the model in {directory} does not take model.json's input, images of shape {shape} "
                          f"({first_line(err)}); {AGAIN}") from None  # fmt: skip
    if tuple(logits.shape) != (1, len(info["classes"])):
        raise ExportError(f"the model in {directory} answers {tuple(logits.shape)[1:]} numbers an image, and "
                          f"model.json names {len(info['classes'])} classes; {AGAIN}")  # fmt: skip
    return model


def load(directory: Path, runtime: str, device: str = "cpu"):
    """The export's model as a function from ``uint8`` images ``(N, C, H, W)`` to logits, both torch tensors on the
    CPU. Raises ExportError for a file the runtime cannot load."""
    path = directory / ("model.onnx" if runtime == "onnx" else "model.pt2")
    try:
        if runtime == "onnx":
            import onnxruntime

            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        from torch.export.passes import move_to_device_pass

        # torch.export.load logs each format it tried, traceback and all, before it raises: the message below says it
        logging.getLogger("torch.export").setLevel(logging.ERROR)
        program = move_to_device_pass(torch.export.load(path), device).module()
    except Exception as err:  # each runtime raises its own types for a missing, truncated or foreign file
        raise ExportError(f"{path} cannot be loaded by {runtime} ({first_line(err)}); {AGAIN}") from None

    def run(x):
        with torch.no_grad():
            return program(x.to(device)).cpu()

    return run


def export_of(run: Path, ckpt: str) -> Path:
    """The export directory to serve: ``run`` itself if it is one; else the newest ``run/export_<k>`` that passed its
    parity check and was made from the checkpoint ``ckpt`` names (by its bytes' digest: a run moved or copied keeps
    its exports); else a new one (``export``, with its parity check)."""
    if (run / "model.json").is_file():
        return run
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"serve {run}: give a run directory (logs/<name>/version_<n>, with config.yaml) or an "
                          "export directory (with model.json and model.onnx).")  # fmt: skip
    from project.commands import export
    from project.files import digest
    from project.runs import checkpoint

    path = checkpoint(run, ckpt).resolve()
    if not path.is_file():
        raise ConfigError(f"serve --ckpt_path {ckpt}: {path} is not a file.")
    wanted = digest(path)
    for directory in sorted(run.glob("export_*"), key=lambda p: p.stat().st_mtime_ns, reverse=True):
        try:
            info = json.loads((directory / "model.json").read_text())
        except (OSError, ValueError):  # an export interrupted, or not one
            continue
        checked = isinstance(info, dict) and info.get("parity", {}).get("passed") is True
        if checked and info.get("checkpoint_sha256") == wanted:
            return directory
    print(f"{run} has no export of {path.name} that passed its parity check: exporting it first. (The check reads "
          "the run's test images; if they have moved, run python -m project export RUN --data.source.root DIR, or "
          "--data.data_dir DIR, first.)")  # fmt: skip
    return export.main(["export", str(run), "--ckpt_path", str(path)])


def check_address(host: str, port: int) -> None:
    """One message for an address LitServe cannot bind to, before any worker starts."""
    import socket

    if host not in HOSTS:
        raise ConfigError(f"serve --host {host}: give 127.0.0.1 (this machine only, the default), or 0.0.0.0 or :: "
                          "(every interface, IPv4 or IPv6); LitServe binds to no other address.")  # fmt: skip
    if not 1024 <= port <= 65535:
        raise ConfigError(f"serve --port {port}: give a port from 1024 to 65535.")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
        try:
            s.bind((host, port))
        except OSError as err:
            raise ConfigError(f"serve: cannot listen on {host}:{port} ({err.strerror}); another server may have it: "
                              "choose another --port.") from None  # fmt: skip


def main(argv: list[str]) -> Path:
    """``argv``: ``serve`` and its arguments."""
    parser = argparse.ArgumentParser(
        prog="python -m project serve",
        description=__doc__.split("\n\n")[0],
        epilog=f"Send images as multipart fields named {FIELD!r}: curl -F {FIELD}=@a.png -F {FIELD}=@b.png "
        "http://127.0.0.1:8000/predict",
        allow_abbrev=False,
    )
    parser.add_argument("run", type=Path, help="a run directory (logs/<name>/version_<n>) or an export directory")
    parser.add_argument("--ckpt_path", default="best", help="best (default), last, or a .ckpt file (of a run)")
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default: this machine only), 0.0.0.0 or ::")
    parser.add_argument("--port", type=int, default=8000, help="default 8000")
    parser.add_argument("--runtime", choices=("onnx", "torch"), default="onnx",
                        help="onnx (default: ONNX Runtime on the CPU) or torch (the .pt2 program, on a GPU if torch "
                             "sees one)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=1, help="processes running the model (per GPU), default 1")
    parser.add_argument("--max_batch_size", type=int, default=8,
                        help="requests the server runs through the model together, default 8")  # fmt: skip
    parser.add_argument("--batch_timeout", type=float, default=0.002,
                        help="seconds a worker waits for a batch to fill, default 0.002")  # fmt: skip
    parser.add_argument("--top_k", type=int, default=5, help="classes answered per image, default 5")
    parser.add_argument("--max_upload_mb", type=float, default=20, help="largest request body in MB (413), default 20")
    parser.add_argument("--timeout", type=float, default=30,
                        help="seconds a request may wait for its answer (then 504), default 30")  # fmt: skip
    args = parser.parse_args(argv[1:])
    for name, smallest in (("workers", 1), ("max_batch_size", 1), ("top_k", 1), ("batch_timeout", 0)):
        if getattr(args, name) < smallest:
            raise ConfigError(f"serve --{name} {getattr(args, name)}: give {smallest} or more.")
    for name in ("max_upload_mb", "timeout"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"serve --{name} {getattr(args, name)}: give more than 0.")
    if args.batch_timeout >= args.timeout:
        raise ConfigError(f"serve --batch_timeout {args.batch_timeout}: give less than --timeout {args.timeout}.")
    host = "127.0.0.1" if args.host == "localhost" else args.host
    check_address(host, args.port)
    directory = export_of(args.run, args.ckpt_path)
    info = model_info(directory)
    ready(directory, info, args.runtime)  # here, in one message, not in a worker's traceback at each request
    server = build(directory, info, args)
    local = "[::1]" if host == "::" else "127.0.0.1"
    where = f"http://{local}:{args.port}/" + ("" if host == "127.0.0.1" else " (and every interface's address)")
    print(f"Serving {directory / ('model.onnx' if args.runtime == 'onnx' else 'model.pt2')} at {where}: the web "
          "page at /, POST /predict, GET /health. Ctrl+C stops it.")  # fmt: skip
    main_process = os.getpid()

    def stop(signum, frame):
        # Ctrl+C and SIGTERM take LitServe's Ctrl+C path in the main process, which stops the others in turn. The
        # processes LitServe forks inherit this handler: the one holding its queues waits to be stopped, and uvicorn's,
        # which raises again the signals it took once it has finished, then ends without a KeyboardInterrupt.
        # Installed for SIGINT too where a script started the server with SIGINT ignored: uvicorn's process would
        # take it anyway, and leave the others serving nothing.
        if os.getpid() == main_process:
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.run(host=host, port=args.port, log_level="warning", generate_client_file=False)
    except (EOFError, ConnectionError) as err:  # the process holding LitServe's queues was killed
        raise ProjectError(f"serve stopped: a process of LitServe's ended ({type(err).__name__}).") from None
    finally:
        # LitServe 0.2.19's thread watching the workers outlives the process holding its queues, which it has just
        # stopped, and logs a traceback if it wakes before this process has ended
        logging.getLogger("litserve.server").setLevel(logging.CRITICAL)
    print("Stopped.")
    return directory


def build(directory: Path, info: dict, args):
    """The LitServer: the API, the checks of uploads, the web page at ``/`` and errors as ``{"error": "..."}``."""
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException

    batching = {"max_batch_size": args.max_batch_size, "batch_timeout": args.batch_timeout}
    api = ImageAPI(directory, args.runtime, args.top_k, **batching)
    checks = {"path": api.api_path, "limit": int(args.max_upload_mb * 1e6), "timeout": args.timeout}
    server = ls.LitServer(
        api,
        accelerator="cpu" if args.runtime == "onnx" else "auto",
        workers_per_device=args.workers,
        timeout=args.timeout,  # in the queue, before a worker takes the request
        middlewares=[(Uploads, checks)],
        model_metadata={
            "classes": info["classes"],
            "input": info["input"],
            "export": str(directory),
            "checkpoint": info.get("checkpoint"),
            "max_upload_mb": args.max_upload_mb,
        },
        disable_openapi_url=True,
        restart_workers=True,  # a worker that dies (out of memory, kill -9) is started again
    )

    async def error(request, err: HTTPException):
        return JSONResponse({"error": err.detail}, status_code=err.status_code)

    server.app.add_exception_handler(HTTPException, error)
    # python-multipart logs a malformed body's details as a warning on the server's terminal; the client is told
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    # LitServe 0.2.19 answers GET / with the text "litserve running", and has no setting to leave it out
    server.app.router.routes = [r for r in server.app.router.routes if getattr(r, "path", None) != "/"]
    text = page(info, directory)
    server.app.add_api_route("/", lambda: HTMLResponse(text), methods=["GET"], include_in_schema=False)
    return server


class Uploads:
    """Answers a POST to the predict path that is too large (413) or not a well-formed multipart form (400) itself,
    before LitServe reads it: LitServe 0.2.19 reads any other body as JSON, and answers a body that is neither (an
    empty one among them) with a 500. The body it lets through is handed on as it came, and answered 504 if LitServe
    has not answered it in ``timeout`` seconds: LitServe 0.2.19 times out a request only while it waits in the queue,
    and loses one a worker took as it died, which would otherwise wait for ever."""

    def __init__(self, app, path: str, limit: int, timeout: float):
        self.app, self.path, self.limit, self.timeout = app, path, limit, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.path:
            return await self.app(scope, receive, send)
        from fastapi.responses import JSONResponse
        from starlette.datastructures import Headers
        from starlette.formparsers import MultiPartException, MultiPartParser

        headers = Headers(scope=scope)
        too_large = f"the request is larger than the server's limit of {self.limit / 1e6:g} MB (--max_upload_mb)."
        if not headers.get("content-type", "").startswith("multipart/form-data"):
            why = f"POST {self.path} takes a multipart form (got {headers.get('content-type') or 'no content type'})"
            return await JSONResponse({"error": f"{why}: {USAGE}."}, status_code=400)(scope, receive, send)
        if int(headers.get("content-length") or 0) > self.limit:  # uvicorn answers one that is not a number
            return await JSONResponse({"error": too_large}, status_code=413)(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size, more = size + len(chunks[-1]), message.get("more_body", False)
            if size > self.limit:
                return await JSONResponse({"error": too_large}, status_code=413)(scope, receive, send)
        body = b"".join(chunks)

        async def stream():
            yield body

        try:
            await (await MultiPartParser(headers, stream()).parse()).close()
        except MultiPartException as err:
            error = {"error": f"the multipart form cannot be read ({err.message.rstrip('.')})."}
            return await JSONResponse(error, status_code=400)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:  # the body is all there was: what comes next is the client leaving
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            return await asyncio.wait_for(self.app(scope, replay, send), self.timeout)
        except asyncio.TimeoutError:  # LitServe sends its answer in one go: none of it has gone out
            error = {"error": f"no answer within {self.timeout:g} s (--timeout): the server is busy, or a worker died."}
            return await JSONResponse(error, status_code=504)(scope, receive, send)


def page(info: dict, directory: Path) -> str:
    """The web page: pick or drop images, see each one's top classes as bars."""
    template = (Path(__file__).with_name("serve.html")).read_text()
    shape = info["input"]["shape"]
    facts = f"{len(info['classes'])} classes, {shape[2]}x{shape[3]} {'RGB' if shape[1] == 3 else 'grayscale'}"
    title = html.escape("/".join(directory.absolute().parts[-3:]))  # logs/<name>/version_<n>/export_<k>: its run
    return template.replace("{{title}}", title).replace("{{facts}}", facts)
