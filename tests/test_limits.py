"""Resource caps (the recipe's [limits]): archives, downloads and directory inputs cannot exhaust the
machine; each is refused with exit 2 naming the limit. Servers run on 127.0.0.1 only."""

from __future__ import annotations

import http.server
import io
import tarfile
import threading
import time
from pathlib import Path

import blake3
import pytest

from .conftest import TINY, run_cli

TINY_TEXT = TINY.read_text()


def recipe_with(tmp: Path, inputs: str, limits: str) -> Path:
    text = TINY_TEXT.split("[[inputs]]")[0] + inputs + "\n[dataset]" + TINY_TEXT.split("[dataset]")[1]
    text += f"\n[limits]\n{limits}\n"
    p = tmp / "r.toml"
    p.write_text(text)
    return p


def test_archive_over_the_extraction_limit_is_refused(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = b"\0" * 200_000
        info = tarfile.TarInfo("pkg/zeros.c")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    arc = tmp_path / "bomb.tar.gz"
    arc.write_bytes(buf.getvalue())
    b3 = blake3.blake3(arc.read_bytes()).hexdigest()
    r = recipe_with(tmp_path, f'[[inputs]]\nname = "src"\nkind = "path"\npath = "{arc}"\nblake3 = "{b3}"\n',
                    "max_extracted_bytes = 100000")
    p = run_cli("build", str(r), "--out", str(tmp_path / "o"), store=tmp_path / "store")
    assert p.returncode == 2 and "limits.max_extracted_bytes" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert len(arc.read_bytes()) < 1000  # 200 KB of zeros in a few hundred bytes: the shape of a bomb


def test_directory_input_over_the_file_limit_is_refused(tmp_path):
    d = tmp_path / "tree"
    d.mkdir()
    for i in range(5):
        (d / f"f{i}.c").write_text("int x;\n")
    r = recipe_with(tmp_path, f'[[inputs]]\nname = "src"\nkind = "path"\npath = "{d}"\nblake3 = "{"0" * 64}"\n',
                    "max_extracted_files = 3")
    p = run_cli("fetch", str(r), store=tmp_path / "store")
    assert p.returncode == 2 and "limits.max_extracted_files" in p.stderr, p.stderr


def test_a_path_input_under_proc_ends_cleanly(tmp_path):
    r = recipe_with(tmp_path, f'[[inputs]]\nname = "src"\nkind = "path"\npath = "/proc/self"\nblake3 = "{"0" * 64}"\n',
                    "max_extracted_bytes = 1000000\nmax_extracted_files = 2000")
    t0 = time.monotonic()
    p = run_cli("fetch", str(r), store=tmp_path / "store")
    assert p.returncode == 2 and "Traceback" not in p.stderr and time.monotonic() - t0 < 60, p.stderr


class Server:
    """A loopback HTTP server whose handler is `behaviour(handler)`."""

    def __init__(self, behaviour):
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                try:
                    behaviour(self)
                except OSError:
                    pass

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/x.c"

    def close(self):
        self.httpd.shutdown()


def big(h, announce=True):
    h.send_response(200)
    if announce:
        h.send_header("Content-Length", str(3 << 20))
    h.end_headers()
    for _ in range(3):
        h.wfile.write(b"x" * (1 << 20))


def trickle(h):
    h.send_response(200)
    h.end_headers()
    for _ in range(100):
        h.wfile.write(b"x")
        h.wfile.flush()
        time.sleep(0.3)


def stall(h):
    h.send_response(200)
    h.end_headers()
    h.wfile.write(b"x")
    h.wfile.flush()
    time.sleep(10)


@pytest.mark.parametrize("behaviour,limits,limit", [
    (big, "max_download_bytes = 1048576", "limits.max_download_bytes"),
    (lambda h: big(h, announce=False), "max_download_bytes = 1048576", "limits.max_download_bytes"),
    (trickle, "download_deadline_seconds = 1.5", "limits.download_deadline_seconds"),
    (stall, "download_stall_seconds = 1", "limits.download_stall_seconds"),
    (trickle, "download_min_bytes_per_second = 100\ndownload_rate_window_seconds = 1.5",
     "limits.download_min_bytes_per_second"),
], ids=["announced-too-big", "too-big-unannounced", "one-byte-at-a-time", "stalls", "under-the-minimum-rate"])
def test_download_limits(tmp_path, behaviour, limits, limit):
    srv = Server(behaviour)
    try:
        r = recipe_with(tmp_path, f'[[inputs]]\nname = "src"\nkind = "url"\nurl = "{srv.url}"\nblake3 = "{"0" * 64}"\n',
                        limits)
        t0 = time.monotonic()
        p = run_cli("fetch", str(r), store=tmp_path / "store")
        assert p.returncode == 2 and limit in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert time.monotonic() - t0 < 30
        assert list((tmp_path / "store" / "tmp").iterdir()) == []
    finally:
        srv.close()


def test_a_path_input_of_root_ends_at_the_file_limit(tmp_path):
    r = recipe_with(tmp_path, f'[[inputs]]\nname = "src"\nkind = "path"\npath = "/"\nfilename = "root"\nblake3 = '
                              f'"{"0" * 64}"\n',
                    "max_extracted_files = 50\nmax_extracted_bytes = 10000000")
    t0 = time.monotonic()
    p = run_cli("fetch", str(r), store=tmp_path / "store")
    assert p.returncode == 2 and "limits.max_extracted" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert time.monotonic() - t0 < 60 and list((tmp_path / "store" / "tmp").iterdir()) == []
