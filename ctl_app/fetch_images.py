"""`ctl fetch-images`: download the images a dataset folder needs into DIR/images/<signature>.jpg.

Shop The Look publishes image signatures, not images; this fetches them politely (bounded concurrency, a
per-host rate, retries with backoff for passing failures only) and resumably: an image already there and
valid is kept, and a file appears only complete and validated (written under a temporary name beside it,
then renamed), so a stopped run leaves no partial files and the same command continues it. Every signature
of a run gets one line in DIR/fetch-report.jsonl with its outcome and why.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import string
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import urlsplit

from ctl.retry import backoff
from ctl.settings import parse_float, parse_int
from ctl.terminal import printable
from encoder_service.config import EncoderConfig  # its limits only: no torch, no Pillow

log = logging.getLogger(__name__)

DEFAULT_URL_TEMPLATE = "http://i.pinimg.com/400x/{s[0:2]}/{s[2:4]}/{s[4:6]}/{s}.jpg"
# STL's signatures are 32 hex digits; nothing that could name another folder (`/`, `..`) gets near a path
SIGNATURE = re.compile(r"[0-9A-Za-z_-]{1,128}")
REPORT = "fetch-report.jsonl"
OK = ("downloaded", "present")
OUTCOMES = (
    *OK,
    "not_found",
    "http_error",
    "timeout",
    "connection_error",
    "too_many_redirects",
    "not_an_image",
    "too_large",
    "invalid_signature",
    "write_error",
)
MAX_REDIRECTS = 5
MAX_BACKOFF = 30.0  # seconds: the longest pause between two attempts by backoff
MAX_RETRY_AFTER = 60.0  # seconds: a longer Retry-After is cut to this (the attempts still run out)
RETRIED_STATUS = frozenset({408, 429, *range(500, 600)})
USER_AGENT = "ctl-fetch-images/0.1"
_FIELD = re.compile(r"s(?:\[(-?[0-9]*):(-?[0-9]*)\])?")
_PART = re.compile(r"\.[0-9A-Za-z_-]{1,128}\.[0-9a-f]{8}\.part")
_SECONDS = re.compile(r"[0-9]{1,10}")


class FetchError(Exception):
    """The run cannot start (a bad template, list or folder); the message says why, in one line."""


class Failed(Exception):
    """One attempt at one image failed: the report's outcome and reason, and whether to try again."""

    def __init__(
        self, outcome: str, reason: str, *, retry: bool = False, wait: float | None = None, size: int = 0
    ):
        super().__init__(reason)
        self.outcome, self.reason, self.retry, self.wait, self.size = outcome, reason, retry, wait, size


@dataclass(frozen=True)
class FetchConfig:
    url_template: str = DEFAULT_URL_TEMPLATE
    concurrency: int = 16
    rate: float = 20.0  # requests a second to one host; 0: no limit
    timeout: float = 20.0  # seconds one attempt may take, connecting and reading the whole body
    retries: int = 3
    backoff: float = 1.0  # seconds before the first retry, doubled for each next one (with jitter)
    max_image_bytes: int = EncoderConfig.max_image_bytes  # the encoder's limits: what it would refuse
    max_image_pixels: int = EncoderConfig.max_image_pixels


@dataclass
class Summary:
    total: int
    report: Path
    counts: Counter = field(default_factory=Counter)
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.interrupted and all(outcome in OK for outcome in +self.counts)

    def format(self, images: Path) -> str:
        lines = [f"fetch-images: {self.total} images for {images}"]
        lines += [
            f"  {outcome:<20} {self.counts[outcome]:>8}" for outcome in OUTCOMES if self.counts[outcome]
        ]
        left = self.total - sum(self.counts.values())
        if left:
            lines.append(f"  {'not tried':<20} {left:>8}")
        lines.append(f"report: {self.report}")
        if self.interrupted:
            lines.append("interrupted: run the same command again to continue (finished images are kept)")
        return "\n".join(lines)


def url_maker(template: str) -> Callable[[str], str]:
    """`template` -> (signature -> URL). The only fields are `{s}` and its slices `{s[i:j]}`: str.format
    cannot slice, and would also read attributes and items (`{s.__class__}`)."""
    parts: list[str | slice] = []
    try:
        for literal, name, spec, conversion in string.Formatter().parse(template):
            parts.append(literal)
            if name is None:
                continue
            found = _FIELD.fullmatch(name)
            if found is None or spec or conversion:
                raise ValueError(f"{{{name}...}} is not {{s}} or {{s[i:j]}}")
            bounds = [int(b) if b else None for b in found.groups()]
            parts.append(slice(*bounds))
    except ValueError as exc:  # the parser's too: "Single '}' encountered in format string"
        raise FetchError(f"--url-template {template!r}: {exc} (write {{{{ and }}}} for braces)") from None

    def url(signature: str) -> str:
        return "".join(p if isinstance(p, str) else signature[p] for p in parts)

    example = urlsplit(url("0123456789abcdef"))
    if not any(isinstance(p, slice) for p in parts):
        raise FetchError(f"--url-template {template!r}: no {{s}}: every image would come from one URL")
    if example.scheme not in ("http", "https") or not example.hostname:
        raise FetchError(f"--url-template {template!r}: expected an http:// or https:// URL with a host")
    return url


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """The seconds a Retry-After header asks for (a number or an HTTP date), at most MAX_RETRY_AFTER; None
    when absent or unreadable."""
    value = (value or "").strip()
    if _SECONDS.fullmatch(value):
        seconds = float(value)
    else:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - (time.time() if now is None else now)
        except (TypeError, ValueError, IndexError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def check_image(data: bytes, max_bytes: int, max_pixels: int) -> None:
    """Raises Failed (not_an_image, too_large) unless `data` decodes as the encoder would accept it."""
    from encoder_service.decode import decode_image
    from encoder_service.errors import ImageError, ImageTooLarge

    try:
        decode_image(data, 16, max_bytes, max_pixels)  # 16 px: JPEGs decode at 1/8 scale, fast
    except ImageTooLarge as exc:
        raise Failed("too_large", str(exc), size=len(data)) from None
    except ImageError as exc:
        raise Failed("not_an_image", str(exc), size=len(data)) from None


def present_size(path: Path, max_bytes: int, max_pixels: int) -> int | None:
    """The size of the image at `path` when it is a file the encoder would accept, else None."""
    try:
        if not path.is_file():  # a FIFO would block the read
            return None
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
        check_image(data, max_bytes, max_pixels)
    except (OSError, Failed) as exc:
        log.debug("%s: not kept: %s", path, exc)
        return None
    return len(data)


def store(data: bytes, path: Path, max_bytes: int, max_pixels: int) -> None:
    """Validate `data`, write it under a temporary name beside `path` and rename: `path` is complete or
    absent. Without fsync: a file cut short by a crash fails validation next run and is fetched again."""
    check_image(data, max_bytes, max_pixels)
    part = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.part")
    try:
        with open(part, "xb") as f:
            f.write(data)
        os.replace(part, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            part.unlink()
        if isinstance(exc, OSError):
            raise Failed("write_error", f"{path}: {exc.strerror or exc}") from None
        raise


class HostRate:
    """At most `rate` request starts a second to each host, evenly spaced (no bursts)."""

    def __init__(self, rate: float):
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.next: dict[str, float] = {}

    async def wait(self, host: str) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        start = max(now, self.next.get(host, now))
        self.next[host] = start + self.interval
        await asyncio.sleep(start - now)


class Fetcher:
    """One image: already there, or downloaded with retries; the result is the report's line."""

    def __init__(self, client, images: Path, config: FetchConfig):
        self.client, self.images, self.config = client, images, config
        self.url = url_maker(config.url_template)
        self.rate = HostRate(config.rate)

    async def one(self, signature: str) -> dict:
        if not SIGNATURE.fullmatch(signature):
            return _result(signature, None, "invalid_signature", "expected 1-128 of 0-9 A-Z a-z _ -", 0, 0)
        path, url, limits = self.images / f"{signature}.jpg", self.url(signature), self._limits()
        size = await asyncio.to_thread(present_size, path, *limits)
        if size is not None:
            return _result(signature, url, "present", "", 0, size)
        attempts, pauses = 0, backoff(self.config.backoff, MAX_BACKOFF, jitter=True)
        while True:
            attempts += 1
            await self.rate.wait(urlsplit(url).hostname or "")
            try:
                data = await self._get(url)
                await asyncio.to_thread(store, data, path, *limits)
                return _result(signature, url, "downloaded", "", attempts, len(data))
            except Failed as failed:
                if not failed.retry or attempts > self.config.retries:
                    log.debug("%s: %s: %s", url, failed.outcome, printable(failed.reason))
                    return _result(signature, url, failed.outcome, failed.reason, attempts, failed.size)
                await asyncio.sleep(max(next(pauses), failed.wait or 0.0))

    def _limits(self) -> tuple[int, int]:
        return self.config.max_image_bytes, self.config.max_image_pixels

    async def _get(self, url: str) -> bytes:
        """The body of one attempt, or Failed: the whole attempt, redirects included, within the timeout."""
        import httpx

        try:
            return await asyncio.wait_for(self._read(url), self.config.timeout)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            raise Failed(
                "timeout", f"no complete answer within {self.config.timeout:g} s", retry=True
            ) from None
        except httpx.TooManyRedirects:
            raise Failed("too_many_redirects", f"more than {MAX_REDIRECTS} redirects") from None
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:  # a redirect to ftp:, say
            raise Failed("http_error", _describe(exc)) from None
        except httpx.TransportError as exc:  # refused, reset, cut short
            raise Failed("connection_error", _describe(exc), retry=True) from None
        except httpx.HTTPError as exc:  # a body that does not decompress, ...
            raise Failed("http_error", _describe(exc)) from None

    async def _read(self, url: str) -> bytes:
        max_bytes = self.config.max_image_bytes
        async with self.client.stream("GET", url) as response:
            status = response.status_code
            if not response.is_success:
                reason = f"HTTP {status} {response.reason_phrase}".rstrip()
                if status in (404, 410):
                    raise Failed("not_found", reason)
                wait = retry_after(response.headers.get("retry-after")) if status in (429, 503) else None
                raise Failed("http_error", reason, retry=status in RETRIED_STATUS, wait=wait)
            declared = response.headers.get("content-length", "")
            if declared.isascii() and declared.isdigit() and int(declared) > max_bytes:
                raise Failed("too_large", f"{declared} bytes announced, over the limit of {max_bytes} bytes")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > max_bytes:  # stop reading: the rest may be endless
                    raise Failed("too_large", f"over the limit of {max_bytes} bytes; stopped reading")
            return bytes(body)


def _result(signature: str, url: str | None, outcome: str, reason: str, attempts: int, size: int) -> dict:
    return {
        "signature": signature,
        "url": url,
        "outcome": outcome,
        "reason": reason,
        "attempts": attempts,
        "bytes": size,
    }


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def fetch(
    signatures: list[str], images: Path, config: FetchConfig, on_result: Callable[[dict], None]
) -> None:
    """Fetch each signature once, `config.concurrency` at a time; `on_result` gets each report line."""
    import httpx

    limits = httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency)
    async with httpx.AsyncClient(
        timeout=config.timeout,
        limits=limits,
        follow_redirects=True,
        max_redirects=MAX_REDIRECTS,
        headers={"User-Agent": USER_AGENT},
    ) as client:
        fetcher = Fetcher(client, images, config)
        pending = iter(signatures)

        async def worker() -> None:
            for signature in pending:  # shared: each worker takes the next one left
                on_result(await fetcher.one(signature))

        await asyncio.gather(*(worker() for _ in range(min(config.concurrency, len(signatures)))))


def fetch_images(signatures: Iterable[str], root: Path, config: FetchConfig) -> Summary:
    """Fetch into root/images with a progress bar, one report line per signature in root/REPORT (written as
    each ends). Ctrl-C ends the run cleanly: Summary.interrupted. FetchError when it cannot start."""
    url_maker(config.url_template)
    for module in ("httpx", "PIL"):
        try:
            __import__(module)
        except ImportError:
            raise FetchError(f"ctl fetch-images needs {module}: pip install 'ctl[model]'") from None
    signatures = list(dict.fromkeys(signatures))
    root = Path(root)
    if not root.is_dir():
        raise FetchError(f"{root}: not a folder")
    images = root / "images"
    summary = Summary(len(signatures), root / REPORT)
    try:
        images.mkdir(exist_ok=True)
        # never through a link: a planted fetch-report.jsonl link would empty its target
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        report = os.fdopen(os.open(summary.report, flags, 0o644), "a")  # locked, then emptied, before use
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise FetchError(f"{summary.report}: is a symbolic link; refusing to write through it") from None
        raise FetchError(f"{exc.filename or summary.report}: {exc.strerror or exc}") from None
    with report:
        try:  # one run per folder: it may remove the temporary files it finds
            fcntl.flock(report, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FetchError(
                f"{root}: another ctl fetch-images is running there (it holds {REPORT})"
            ) from None
        report.truncate(0)
        for leftover in images.iterdir():  # from a run killed outright
            if _PART.fullmatch(leftover.name):
                leftover.unlink(missing_ok=True)
        from ctl.progress import progress_bar

        with progress_bar(len(signatures), "fetch images", "img") as bar:

            def done(result: dict) -> None:
                summary.counts[result["outcome"]] += 1
                report.write(json.dumps(result) + "\n")
                report.flush()
                bar.update()

            try:
                asyncio.run(fetch(signatures, images, config, done))
            except KeyboardInterrupt:
                summary.interrupted = True
    return summary


def _signatures(args: argparse.Namespace) -> list[str]:
    if args.list is not None:
        try:
            lines = args.list.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise FetchError(f"--list {args.list}: {getattr(exc, 'strerror', None) or exc}") from None
        return [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]
    from style_model.data.examples import images_needed
    from style_model.data.stl import load_dataset

    return images_needed(load_dataset(args.data, args.domain), args.min_crop, args.seed)


def main(args: argparse.Namespace) -> int:
    """0: every image is there; 1: some failed (see the report) or the run was stopped; 2: bad arguments."""
    from style_model.errors import StyleModelError

    if not log.isEnabledFor(logging.DEBUG):
        logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    config = FetchConfig(
        url_template=args.url_template,
        concurrency=args.concurrency,
        rate=args.rate,
        timeout=args.timeout,
        retries=args.retries,
        backoff=args.backoff,
        max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
    )
    try:
        url_maker(config.url_template)
        summary = fetch_images(_signatures(args), args.data, config)
    except (FetchError, StyleModelError) as exc:
        log.error("%s", exc)
        return 2
    print(summary.format(args.data / "images"))
    return 130 if summary.interrupted else 0 if summary.ok else 1


def _number(parse: Callable[[str], float], low: float, high: float):
    def check(text: str):
        value = parse(text)
        if not low <= value <= high:  # also refuses nan
            raise argparse.ArgumentTypeError(f"expected {low:g}..{high:g}, got {text!r}")
        return value

    return check


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fetch-images",
        help="download the images a dataset folder needs into DIR/images (resumable)",
        description="Downloads the images `ctl examples --needed` lists (or those of --list) into "
        "DIR/images/<signature>.jpg, skipping those already there and valid; every signature gets a line in "
        "DIR/fetch-report.jsonl. Exit status 0: all there; 1: some failed; 2: bad arguments; 130: stopped "
        "(run it again to continue). See docs/REAL_DATA.md.",
    )
    env_data = os.environ.get("CTL_DATA")
    p.add_argument(
        "--data",
        type=Path,
        metavar="DIR",
        default=env_data,
        required=env_data is None,
        help="dataset folder in STL layout (env CTL_DATA)",
    )
    p.add_argument("--domain", default=None, help="domain, when the folder has several (fashion, home)")
    p.add_argument("--min-crop", type=float, default=0.2, help="as `ctl examples` (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="as `ctl examples` (default %(default)s)")
    p.add_argument(
        "--list", type=Path, metavar="FILE", help="fetch these signatures instead (one a line; # comments)"
    )
    p.add_argument(
        "--url-template",
        default=DEFAULT_URL_TEMPLATE,
        help="where an image is: {s} is the signature, {s[i:j]} a slice of it (default: Shop The Look's, "
        "%(default)s)",
    )
    number_args = (
        ("--concurrency", parse_int, 1, 1024, 16, "downloads at once"),
        ("--rate", parse_float, 0, 1e6, 20.0, "requests a second to one host, 0: no limit"),
        ("--timeout", parse_float, 0.001, 3600, 20.0, "seconds one attempt may take, connect to last byte"),
        ("--retries", parse_int, 0, 100, 3, "retries of a passing failure (5xx, 429, timeout, reset)"),
        ("--backoff", parse_float, 0, 3600, 1.0, "seconds before the first retry, doubled each time"),
        ("--max-image-bytes", parse_int, 1, 1 << 40, FetchConfig.max_image_bytes, "largest image, bytes"),
        ("--max-image-pixels", parse_int, 1, 1 << 40, FetchConfig.max_image_pixels, "largest image, pixels"),
    )
    for flag, parse, low, high, default, text in number_args:
        p.add_argument(
            flag, type=_number(parse, low, high), default=default, help=f"{text} (default {default})"
        )
    p.set_defaults(func=main)
