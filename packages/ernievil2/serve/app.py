"""ernievil2-serve INDEX: a page and a JSON API over a search index, on this machine only by
default (127.0.0.1).

  ernievil2-serve INDEX [--host 127.0.0.1] [--port 8000] [--classes NAME_OR_FILE] [--lang zh|en]
                  [--templates FILE] [--max-upload-mb 10] [--access-log]

The page (static HTML/JS/CSS shipped in serve/static, nothing fetched from the internet) searches
the index by text or by an uploaded image, searches the stored captions, and classifies an upload
zero-shot: the class names go into zeroshot.py's prompt templates, and the class embeddings are
computed once, at start. The API (JSON; errors are {"error": "one line"}):

  GET  /api/info                      index size, classes, language, limits
  GET  /api/search?q=TEXT&k=10        text -> images
  POST /api/search/image?k=10         multipart field `image` -> images
  GET  /api/captions?q=TEXT&k=10      text -> stored captions
  POST /api/classify?k=5              multipart field `image` -> classes
  GET  /thumbs/ROW                    an index row's thumbnail (by row number, never by path)
  GET  /api/openapi.json              the OpenAPI schema (no /docs: Swagger UI comes from a CDN)

Limits: a query of at most 256 characters, k in 1..100, an upload of at most --max-upload-mb
(413 before its body is read) and of at most max_image_pixels pixels (413, read from the header),
an undecodable upload is a 400, a bad parameter a 422.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import uvicorn
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import zeroshot
from ..cli import run_main
from ..logging_utils import setup_logging
from ..search import MAX_IMAGE_BYTES, QueryError, Searcher
from ..transforms import get_max_image_pixels, image_header_size

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
SHIPPED_CLASSES = HERE / "classes"
DEFAULT_CLASSES = "everyday"

MAX_QUERY_CHARS = 256
MAX_K = 100
DEFAULT_MAX_UPLOAD_MB = 10
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around the uploaded file
# No inline script or style, nothing from another origin: the page works offline, by construction.
CSP = "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'"


class Limits(NamedTuple):
    max_query_chars: int = MAX_QUERY_CHARS
    max_k: int = MAX_K
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB << 20
    max_image_pixels: int | None = None  # None: decode_image's process-wide limit


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Classifier(NamedTuple):
    """Zero-shot classes: names, the templates used and their embeddings [C, D] (zeroshot.py)."""
    names: list
    templates: list
    embeddings: np.ndarray

    @classmethod
    def build(cls, encode_texts, names: Sequence[str], templates: Sequence[str]) -> "Classifier":
        return cls(list(names), list(templates),
                   zeroshot.class_embeddings(encode_texts, names, templates))


def classes_path(value: str) -> str:
    """A class file's path as given, or a shipped list's name (`everyday`, `demo_shapes`)."""
    if os.path.isfile(value) or os.sep in value or "/" in value:
        return value
    shipped = SHIPPED_CLASSES / f"{value.removesuffix('.tsv')}.tsv"
    return str(shipped) if shipped.is_file() else value


def shipped_class_lists() -> list[str]:
    return sorted(p.stem for p in SHIPPED_CLASSES.glob("*.tsv"))


# ------------------------------------------------------------------------------------ the app
class _BodyLimit:
    """ASGI middleware: a request body over the limit is refused with 413 before it is read
    (uploads are parsed, and spooled to disk, only after this); a body without a declared
    length is refused with 411."""

    def __init__(self, app, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            headers = dict(scope["headers"])
            length = headers.get(b"content-length")
            status, message = None, None
            if length is None or not length.strip().isdigit():
                status, message = 411, "the request needs a Content-Length header"
            elif int(length) > self.max_body:
                status = 413
                message = (f"upload of {int(length):,} bytes is over the limit of "
                           f"{self.max_body - MULTIPART_OVERHEAD:,} bytes")
            if status:
                await JSONResponse({"error": message}, status, headers={"Connection": "close"})(
                    scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(searcher, classifier: Classifier | None = None, limits: Limits = Limits(),
               lang: str = "zh"):
    """The FastAPI app over an open Searcher (or any object with its methods)."""
    app = FastAPI(title="ERNIE-ViL 2.0 search", version="1", docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json",
                  description="Text-to-image, image-to-image and caption search over an index; "
                              "zero-shot classification of an uploaded image.")
    index_dir = Path(searcher.index_dir).resolve()
    pixel_limit = limits.max_image_pixels if limits.max_image_pixels is not None else get_max_image_pixels()

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse({"error": exc.message}, exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}"}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, exc.status_code)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    def check_query(q: str) -> str:
        q = " ".join(q.split())
        if not q:
            raise ApiError(422, "q: empty query")
        if len(q) > limits.max_query_chars:
            raise ApiError(422, f"q: query of {len(q)} characters is over the limit of "
                           f"{limits.max_query_chars}")
        return q

    def check_k(k: int) -> int:
        if not 1 <= k <= limits.max_k:
            raise ApiError(422, f"k: {k} is out of range 1..{limits.max_k}")
        return k

    def read_upload(image: UploadFile) -> bytes:
        data = image.file.read(limits.max_upload_bytes + 1)
        if len(data) > limits.max_upload_bytes:
            raise ApiError(413, f"upload is over the limit of {limits.max_upload_bytes:,} bytes")
        if not data:
            raise ApiError(400, "image: empty upload")
        size = image_header_size(np.frombuffer(data, np.uint8))
        if pixel_limit is not None and size is not None and size[0] * size[1] > pixel_limit:
            raise ApiError(413, f"image of {size[0]}x{size[1]} = {size[0] * size[1]:,} pixels is "
                           f"over the limit of {pixel_limit:,} pixels")
        return data

    def model(fn, *args, **kwargs):
        """A searcher call; a query it refuses (an image that does not decode) is a 400."""
        try:
            return fn(*args, **kwargs)
        except QueryError as e:
            raise ApiError(400, str(e)) from None

    def hits_json(query, k, hits):
        return {"query": query, "k": k, "hits": [
            {"rank": h.rank, "score": round(float(h.score), 6), "row": int(h.row),
             "image_id": h.image_id, "caption": h.caption, "thumbnail": f"/thumbs/{int(h.row)}"}
            for h in hits]}

    def text_search(fn, q, k):
        q, k = check_query(q), check_k(k)
        return hits_json(q, k, model(fn, q, k=k))

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/info", summary="The index, the classes and the limits")
    def info():
        return {"images": len(searcher), "index": index_dir.name, "lang": lang,
                "classes": classifier.names if classifier else [],
                "templates": classifier.templates if classifier else [],
                "limits": {"max_query_chars": limits.max_query_chars, "max_k": limits.max_k,
                           "max_upload_bytes": limits.max_upload_bytes,
                           "max_image_pixels": pixel_limit}}

    @app.get("/api/search", summary="Text to image")
    def search_text(q: str = Query(..., description="the query, Chinese or English"),
                    k: int = Query(10, description=f"hits, 1..{MAX_K}")):
        return text_search(searcher.text_to_image, q, k)

    @app.post("/api/search/image", summary="Image to image (multipart field `image`)")
    def search_image(image: UploadFile = File(...), k: int = Query(10)):
        k = check_k(k)
        return hits_json(image.filename, k, model(searcher.image_to_image, read_upload(image), k=k))

    @app.get("/api/captions", summary="Text to stored captions")
    def search_captions(q: str = Query(...), k: int = Query(10)):
        return text_search(searcher.text_to_text, q, k)

    @app.post("/api/classify", summary="Zero-shot classification (multipart field `image`)")
    def classify(image: UploadFile = File(...), k: int = Query(5)):
        if classifier is None:
            raise ApiError(404, "no class list loaded (ernievil2-serve --classes FILE)")
        k = check_k(k)
        s = zeroshot.scores(model(searcher.encode_image_bytes, read_upload(image)), classifier.embeddings)
        best = zeroshot.top_k(s, k)[0]
        return {"k": int(len(best)), "classes": [
            {"rank": r + 1, "index": int(c), "name": classifier.names[c], "score": round(float(s[0, c]), 6)}
            for r, c in enumerate(best)]}

    @app.get("/thumbs/{row:int}", summary="A row's thumbnail (the index's JPEG)")
    def thumbnail(row: int):
        if not 0 <= row < len(searcher):
            raise ApiError(404, f"row {row} is not in the index (0..{len(searcher) - 1})")
        path = Path(searcher.thumbnail_file(row)).resolve()
        if not path.is_relative_to(index_dir) or not path.is_file():  # only the index's own files
            raise ApiError(404, f"row {row} has no thumbnail")
        return FileResponse(path, headers={"Cache-Control": "max-age=3600"})

    app.add_middleware(_BodyLimit, max_body=limits.max_upload_bytes + MULTIPART_OVERHEAD)  # outermost
    return app


# ------------------------------------------------------------------------------- the command
def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="ernievil2-serve", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve a page and a JSON API over a search index (ernievil2-index build): "
                    "text and image search, caption search, zero-shot classification.",
        epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("index", help="index folder (ernievil2-index build)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    p.add_argument("--classes", default=DEFAULT_CLASSES,
                   help="zero-shot class list: a file (imagenet_classes.tsv format, or one name "
                        f"a line) or a shipped list ({', '.join(shipped_class_lists())}); "
                        f"default {DEFAULT_CLASSES}")
    p.add_argument("--lang", choices=("zh", "en"), default="zh",
                   help="page language, class-name column and built-in templates (default zh)")
    p.add_argument("--templates", help="prompt template file, one a line with one {} "
                   "(default: the built-in --lang set)")
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                   help=f"largest image upload in MiB (default {DEFAULT_MAX_UPLOAD_MB})")
    p.add_argument("--access-log", action="store_true", help="log every request on the console")
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        p.error(f"--port {args.port} is out of range 0..65535")
    if not 0 < args.max_upload_mb <= MAX_IMAGE_BYTES >> 20:
        p.error(f"--max-upload-mb must be in (0, {MAX_IMAGE_BYTES >> 20}] (the searcher's limit)")
    return args


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads so a busy port fails at once."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    return socket.create_server((host, port), family=family, reuse_port=False)


def run(argv=None):
    args = parse_args(argv)
    setup_logging(None, level=logging.WARNING)  # the console shows the address, warnings and errors
    classes = classes_path(args.classes)
    for path, what in ((classes, "--classes"), (args.templates, "--templates")):
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"{what} not found: {path}" + (
                f" (shipped lists: {', '.join(shipped_class_lists())})" if what == "--classes" else ""))
    names = zeroshot.load_classes(classes, args.lang)
    templates = zeroshot.load_templates(args.templates) if args.templates else zeroshot.TEMPLATES[args.lang]
    try:
        sock = listen(args.host, args.port)
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 1

    searcher = Searcher.open(args.index)
    classifier = Classifier.build(searcher.encode_texts, names, templates)
    app = create_app(searcher, classifier, Limits(max_upload_bytes=int(args.max_upload_mb * (1 << 20))),
                     args.lang)

    host, port = sock.getsockname()[:2]
    address = f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                print(f"ernievil2-serve: {address}  ({len(searcher)} images, {len(names)} classes; "
                      "Ctrl-C to stop)", flush=True)

    server = Server(uvicorn.Config(app, access_log=args.access_log,
                                   log_level="info" if args.access_log else "warning"))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down cleanly
        pass
    return 0 if server.started else 1


def main(argv=None):
    """Console script ernievil2-serve."""
    sys.exit(run_main(run, argv) or 0)


if __name__ == "__main__":
    main()
