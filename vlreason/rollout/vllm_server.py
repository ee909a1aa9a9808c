"""A vLLM rollout server (``vlreason rollout-server``) and the client the vLLM engine uses with
``rollout.engine_options.url``.

The server holds one ``LocalVLLM`` and answers, one request at a time (a lock; health checks
answer meanwhile):

- ``GET /health``: ``{"status": "ok", "model": identity, "weight_pushes": n}``;
- ``POST /generate``: JSON ``{"images": [PNG as base64], "requests": [{"ids", "images" (indices
  into the image table), "max_tokens", "seed"}], "decoding": {"temperature", "top_p",
  "stop_id", "banned"}}`` → ``{"outputs": [{"ids", "logprobs", "ended"}]}``; an image shared by
  several rows (the G samples of a prompt) travels once;
- ``POST /weights``: the weights as a chunked stream of frames, each an 8-byte big-endian length
  and a safetensors blob of about ``BUCKET_BYTES``, ended by a zero length; the server loads them
  as they arrive (one bucket in memory at a time);
- ``POST /shutdown``: stops the server.

The client checks at start-up that the server answers and serves a model of the trainer's family
and sizes (``identity``), and names the fix when it does not. Weights are then pushed before the
first rollout, so both start from the trainer's weights. With several trainer processes only the
first pushes; the others wait for it (``torch.distributed`` barrier) before sampling.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import struct
import threading
from collections.abc import Iterable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import torch
from PIL import Image

from vlreason.rollout.vllm_backend import Decoding, EngineError, Generated, LocalVLLM, Request

logger = logging.getLogger(__name__)
BUCKET_BYTES = 256 * 1024**2


# ---- the wire format ----------------------------------------------------------------------------


def encode_image(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def generate_payload(requests: Sequence[Request], decoding: Decoding) -> dict[str, Any]:
    """The JSON body of ``/generate``: each distinct image object once, rows refer to them by index."""
    table: dict[int, int] = {}
    images: list[str] = []
    rows = []
    for request in requests:
        indices = []
        for image in request.images:
            if id(image) not in table:
                table[id(image)] = len(images)
                images.append(encode_image(image))
            indices.append(table[id(image)])
        rows.append({"ids": request.ids, "images": indices, "max_tokens": request.max_tokens, "seed": request.seed})
    return {"images": images, "requests": rows,
            "decoding": {"temperature": decoding.temperature, "top_p": decoding.top_p, "stop_id": decoding.stop_id,
                         "banned": list(decoding.banned)}}


def weight_frames(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[bytes]:
    """``weights`` as length-prefixed safetensors frames of about ``BUCKET_BYTES``, then a zero length."""
    from safetensors.torch import save

    bucket: dict[str, torch.Tensor] = {}
    size = 0
    for name, tensor in weights:
        bucket[name] = tensor.detach().cpu().contiguous()
        size += tensor.nbytes
        if size >= BUCKET_BYTES:
            yield _frame(save(bucket))
            bucket, size = {}, 0
    if bucket:
        yield _frame(save(bucket))
    yield struct.pack(">Q", 0)


def _frame(blob: bytes) -> bytes:
    return struct.pack(">Q", len(blob)) + blob


def read_weight_frames(stream: io.BufferedIOBase) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of the frames ``weight_frames`` wrote, read from ``stream`` as they arrive."""
    from safetensors.torch import load

    while True:
        length = struct.unpack(">Q", _read_exactly(stream, 8))[0]
        if length == 0:
            return
        yield from load(_read_exactly(stream, length)).items()


def _read_exactly(stream: io.BufferedIOBase, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise EngineError(f"the weight stream ended early ({len(data)} of {size} bytes)")
    return data


class ChunkedReader(io.RawIOBase):
    """The body of a request sent with ``Transfer-Encoding: chunked``, as a plain stream."""

    def __init__(self, raw: io.BufferedIOBase):
        self.raw = raw
        self.left = 0
        self.done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.done:
            return 0
        if self.left == 0:
            line = self.raw.readline()
            self.left = int(line.split(b";")[0].strip() or b"0", 16)
            if self.left == 0:
                self.raw.readline()  # the blank line after the last chunk
                self.done = True
                return 0
        data = self.raw.read(min(len(buffer), self.left))
        buffer[:len(data)] = data
        self.left -= len(data)
        if self.left == 0:
            self.raw.readline()  # the chunk's closing CRLF
        return len(data)


# ---- the server ---------------------------------------------------------------------------------


class RolloutServer(ThreadingHTTPServer):
    """Serves one ``LocalVLLM`` (see the module docstring for the endpoints)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], backend: LocalVLLM, model: dict[str, Any]):
        super().__init__(address, _Handler)
        self.backend = backend
        self.model = model
        self.lock = threading.Lock()
        self.weight_pushes = 0

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: RolloutServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        logger.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        if self.path != "/health":
            return self._reply(404, {"error": f"no such endpoint: GET {self.path}"})
        self._reply(200, {"status": "ok", "model": self.server.model, "weight_pushes": self.server.weight_pushes})

    def do_POST(self) -> None:
        actions = {"/generate": self._generate, "/weights": self._weights, "/shutdown": self._shutdown}
        if self.path not in actions:
            return self._reply(404, {"error": f"no such endpoint: POST {self.path}"})
        try:
            actions[self.path]()
        except Exception as exc:  # the trainer gets the reason; the server keeps serving
            logger.exception("%s failed", self.path)
            self._reply(500, {"error": f"{type(exc).__name__}: {exc}"})

    def _generate(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        images = [decode_image(data) for data in body["images"]]
        requests = [Request(row["ids"], [images[i] for i in row["images"]], row["max_tokens"], row["seed"])
                    for row in body["requests"]]
        decoding = body["decoding"]
        decoding = Decoding(decoding["temperature"], decoding["top_p"], decoding["stop_id"],
                            tuple(decoding["banned"]))
        with self.server.lock:
            outputs = self.server.backend.generate(requests, decoding)
        self._reply(200, {"outputs": [{"ids": o.ids, "logprobs": o.logprobs, "ended": o.ended} for o in outputs]})

    def _weights(self) -> None:
        stream = io.BufferedReader(ChunkedReader(self.rfile))
        with self.server.lock:
            self.server.backend.load_weights(read_weight_frames(stream))
            self.server.weight_pushes += 1
        self._reply(200, {"weight_pushes": self.server.weight_pushes})

    def _shutdown(self) -> None:
        self._reply(200, {"status": "stopping"})
        threading.Thread(target=self.server.shutdown, daemon=True).start()

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


# ---- the client ---------------------------------------------------------------------------------


class RemoteVLLM:
    """The vLLM engine's backend when it samples from a rollout server.

    Args:
        url: the server, e.g. ``http://127.0.0.1:8000``.
        model: the trainer's model ``identity``; a server with another refuses to start (None:
            only check that the server answers).
        timeout_s: limit of one request (a health check waits at most 10 s).

    Raises:
        EngineError: the server does not answer, or serves another model.
    """

    def __init__(self, url: str, model: dict[str, Any] | None, timeout_s: float = 600.0):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise EngineError(f"rollout.engine_options.url {url!r}: expected http://HOST:PORT")
        self.url = url
        self.host, self.port = parts.hostname, parts.port or 80
        self.timeout_s = timeout_s
        served = self.health()["model"]
        if model is not None and served != model:
            different = {key: (served.get(key), model[key]) for key in model if served.get(key) != model[key]}
            raise EngineError(f"the rollout server at {url} serves another model (server vs trainer: {different}); "
                              "start it with the trainer's model: vlreason rollout-server MODEL")

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health", timeout=min(10.0, self.timeout_s))

    def generate(self, requests: Sequence[Request], decoding: Decoding) -> list[Generated]:
        body = json.dumps(generate_payload(requests, decoding)).encode()
        outputs = self._call("POST", "/generate", body)["outputs"]
        return [Generated(o["ids"], o["logprobs"], o["ended"]) for o in outputs]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push the weights from the first trainer process; the others wait until it has."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not distributed or torch.distributed.get_rank() == 0:
            self._call("POST", "/weights", weight_frames(weights), chunked=True)
        if distributed:
            torch.distributed.barrier()

    def sleep(self) -> None:
        """Nothing to free here: the server owns its memory."""

    def wake_up(self) -> None:
        """Nothing to restore here."""

    def shutdown(self) -> None:
        self._call("POST", "/shutdown", b"")

    def _call(self, method: str, path: str, body: bytes | Iterable[bytes] | None = None, chunked: bool = False,
              timeout: float | None = None) -> dict[str, Any]:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout or self.timeout_s)
        try:
            headers = {"Content-Type": "application/octet-stream" if chunked else "application/json"}
            connection.request(method, path, body=body, headers=headers, encode_chunked=chunked)
            response = connection.getresponse()
            payload = json.loads(response.read() or b"{}")
        except (OSError, http.client.HTTPException) as exc:
            raise EngineError(f"the rollout server at {self.url} did not answer {method} {path} ({exc}); start "
                              "it with `vlreason rollout-server MODEL --port PORT`, or raise "
                              "rollout.engine_options.timeout_s") from exc
        finally:
            connection.close()
        if response.status != 200:
            raise EngineError(f"the rollout server at {self.url} failed {method} {path}: "
                              f"{payload.get('error', response.status)}")
        return payload
