"""Real tracker back-ends for the tests, no network: W&B in offline mode (its run files read back record by record)
and a real ``mlflow server`` on 127.0.0.1 (sqlite store, local artifact folder)."""
from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wandb_env(monkeypatch, root: Path) -> None:
    """Offline W&B with every folder of its own under ``root`` (the run files go to the run folder's wandb/)."""
    for var in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_BASE_URL", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    for var, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"), ("WANDB_CONFIG_DIR", "config")):
        (root / sub).mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(var, str(root / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")


def wandb_records(run_file: Path):
    """The protobuf records of a W&B run file (``run-<id>.wandb``: a ':W&B' header, then a LevelDB-style log of
    32 KiB blocks, each record a 7-byte header (crc, length, type: full / first / middle / last))."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = Path(run_file).read_bytes()
    assert raw[:4] == b":W&B", f"{run_file} is not a W&B run file"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # the block's zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        if pos + 7 + length > len(raw):  # a record still being written
            return
        data = raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        buf = data if kind in (1, 2) else buf + data
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def _put(target: dict, item) -> None:
    """A history / summary item into ``target``: ``key`` or ``nested_key`` (an image's fields nest under its tag)."""
    keys = list(item.nested_key) or [item.key]
    for k in keys[:-1]:
        target = target.setdefault(k, {})
    target[keys[-1]] = json.loads(item.value_json)


class WandbRun:
    """What one offline W&B run wrote: config, history rows by step, summary, artifacts, media files."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        self.config, self.history, self.summary, self.artifacts, self.name, self.id = {}, {}, {}, [], "", ""
        (run_file,) = self.dir.glob("run-*.wandb")
        for rec in wandb_records(run_file):
            kind = rec.WhichOneof("record_type")
            if kind == "run":  # the first record, and updates of it (empty fields left as they were)
                self.id = rec.run.run_id or self.id
                self.name = rec.run.display_name or self.name
                self.project = rec.run.project or getattr(self, "project", "")
                self._config(rec.run.config)
            elif kind == "config":
                self._config(rec.config)
            elif kind == "history":
                row: dict = {}
                for item in rec.history.item:
                    _put(row, item)
                self.history.setdefault(int(row["_step"]), {}).update(row)
            elif kind == "summary":
                for item in rec.summary.update:
                    _put(self.summary, item)
            elif kind == "artifact":
                self.artifacts.append(rec.artifact)

    def _config(self, cfg) -> None:
        for u in cfg.update:
            self.config[u.key] = json.loads(u.value_json)

    def series(self, key: str) -> dict[int, float]:
        return {step: row[key] for step, row in sorted(self.history.items()) if key in row}


def wandb_runs(run_folder: Path, timeout: float = 120) -> list[WandbRun]:
    """Every offline W&B run written under ``run_folder``/wandb, oldest first. W&B's service (its own process, which
    can outlive the command) writes a run's file after ``finish()`` returns: wait for each file and its closing
    record."""
    deadline = time.time() + timeout

    def started(d: Path) -> tuple[str, str]:
        """offline-run-<YYYYmmdd_HHMMSS>-<id>, then the first line of its debug.log (milliseconds): two runs started
        in the same second are ordered by the log, not by their ids."""
        log = d / "logs" / "debug.log"
        while not log.is_file() or not log.read_text().strip():
            assert time.time() < deadline, f"{log} was not written in {timeout}s"
            time.sleep(0.2)
        return d.name.split("-")[2], log.read_text().splitlines()[0][:23]
    dirs = sorted((Path(run_folder) / "wandb").glob("offline-run-*"), key=started)
    for d in dirs:
        while not list(d.glob("run-*.wandb")):
            assert time.time() < deadline, f"{d} has no run file after {timeout}s"
            time.sleep(0.2)
        (run_file,) = d.glob("run-*.wandb")
        while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(run_file)):
            assert time.time() < deadline, f"{run_file} has no closing record after {timeout}s"
            time.sleep(0.2)
    return [WandbRun(d) for d in dirs]


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 (a free port), sqlite store and artifact folder under ``root``; started in its
    own process group and ended with it."""

    def __init__(self, root: Path, start_timeout: float = 300):
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
               "--artifacts-destination", str(root / "artifacts")]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")})
        deadline = time.time() + start_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer in {start_timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
