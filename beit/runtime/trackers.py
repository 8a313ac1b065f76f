"""Where a run's results go (``--report_to``): TensorBoard, Weights & Biases, MLflow, through Accelerate's trackers.

Each registered kind gets the same things: the scalars (``RunTrackers.log``), the training pictures
(``log_images``), the run config (at ``start``), the final metrics (``final/<key>``) and, at the end, the run's
files (config, final results, the report of ``beit viz`` when it is there) as artifacts (TensorBoard keeps them
beside its folder in the run folder). Only the main process holds trackers; every other rank gets none.

``check_trackers`` runs at start-up, before any compute: a kind whose package is missing, or whose server does not
answer, stops the run there with a message. ``trackers.json`` in the run folder keeps the W&B and MLflow run ids, so
a resumed run goes on in the same tracker run and ``beit viz`` attaches its report to it.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

TENSORBOARD_RUN = "tensorboard"  # the TensorBoard folder inside a run folder, for every stage
TRACKERS_FILE = "trackers.json"
PROJECT = "beit"  # the W&B project / MLflow experiment unless WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME say otherwise


class TrackerKind:
    """One kind of tracker: its package, its start-up check, and how it takes pictures, a summary and files."""
    name = ""
    package = ""
    extra = ""  # the pyproject extra that installs it

    def check(self, server: bool = True) -> None:
        """Raise ValueError when the kind cannot work here: its package is missing or (``server``) its server does
        not answer."""
        try:
            __import__(self.package)
        except ImportError as e:
            how = f"pip install 'beit-pipeline[{self.extra}]'" if self.extra else f"pip install {self.package}"
            raise ValueError(f"--report_to {self.name}: the {self.package} package is not installed ({e}); install it "
                             f"({how}) or leave {self.name} out of --report_to") from None

    def create(self, run_dir: Path, run_name: str, saved: dict | None):
        """The Accelerate tracker for this run (not started); ``saved`` is what ``ids`` returned for the run's
        previous start, when it resumes."""
        raise NotImplementedError

    def ids(self, tracker) -> dict | None:
        """What a resumed run needs to go on in the same tracker run (None: nothing)."""
        return None

    def log_images(self, tracker, images: dict, step: int) -> None:
        raise NotImplementedError

    def log_summary(self, tracker, metrics: dict, step: int) -> None:
        tracker.log(metrics, step=step)

    def log_files(self, tracker, files: dict[str, Path]) -> None:
        """``files``: artifact path -> local file."""


class TensorBoard(TrackerKind):
    name, package = "tensorboard", "tensorboard"

    def check(self, server: bool = True) -> None:
        super().check()
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as e:
            raise ValueError(f"--report_to tensorboard: torch cannot write TensorBoard files ({e}); install "
                             "tensorboard or leave it out of --report_to") from None

    def create(self, run_dir, run_name, saved):
        from accelerate.tracking import TensorBoardTracker
        return TensorBoardTracker(TENSORBOARD_RUN, run_dir)

    def log_images(self, tracker, images, step):
        for tag, image in images.items():
            tracker.writer.add_image(tag, image, global_step=step, dataformats="HWC")
        tracker.writer.flush()


class WandB(TrackerKind):
    name, package, extra = "wandb", "wandb", "wandb"

    def check(self, server: bool = True) -> None:
        super().check()
        if not server or os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
            return
        import wandb
        url = os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url
        reason = unreachable(url)
        if reason:
            raise ValueError(f"--report_to wandb: cannot reach the W&B server at {url} ({reason}); check the network "
                             "or WANDB_BASE_URL, or log offline with WANDB_MODE=offline (`wandb sync` uploads later)")
        try:  # the API key (WANDB_API_KEY, ~/.netrc, wandb login), not sent: verify=False asks the server nothing
            wandb.login(verify=False)
        except (wandb.errors.UsageError, wandb.errors.AuthenticationError) as e:  # none found / a malformed one
            raise ValueError(f"--report_to wandb: {e} (WANDB_API_KEY, ~/.netrc); run `wandb login` or set "
                             "WANDB_API_KEY, or log offline with WANDB_MODE=offline") from None
        finally:  # login fixed W&B's process-wide settings (mode, server) from this moment's environment: forget them
            wandb.teardown()

    def create(self, run_dir, run_name, saved):
        from accelerate.tracking import WandBTracker
        kw = {"name": run_name}
        if not os.environ.get("WANDB_DIR"):
            kw["dir"] = str(run_dir)  # the run files (and offline runs) in the run folder: run_dir/wandb/
        project = os.environ.get("WANDB_PROJECT") or PROJECT
        if saved and saved.get("id"):
            kw.update(id=saved["id"], resume="allow")
            project = saved.get("project") or project
        return WandBTracker(project, **kw)

    def ids(self, tracker):
        return {"id": tracker.run.id, "project": tracker.run.project}

    def log_images(self, tracker, images, step):
        import wandb
        tracker.run.log({tag: wandb.Image(image) for tag, image in images.items()}, step=step)

    def log_summary(self, tracker, metrics, step):
        tracker.run.summary.update(metrics)

    def log_files(self, tracker, files):
        import wandb
        name = re.sub(r"[^\w.-]", "-", f"run-{tracker.run.id}-files")
        art = wandb.Artifact(name, type="run-files", description="the run's config, final results and report")
        for rel, path in files.items():
            art.add_file(str(path), name=rel)
        tracker.run.log_artifact(art)


class MLflow(TrackerKind):
    name, package, extra = "mlflow", "mlflow", "mlflow"

    def check(self, server: bool = True) -> None:
        super().check()
        if not server:
            return
        import mlflow
        uri = mlflow.get_tracking_uri()
        reason = unreachable(uri.rstrip("/") + "/health") if uri.startswith(("http://", "https://")) else None
        if reason is None:
            try:
                mlflow.MlflowClient(uri).search_experiments(max_results=1)
            except Exception as e:  # noqa: BLE001 - any failure of the client is the message
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if reason:
            raise ValueError(f"--report_to mlflow: cannot use the MLflow tracking server at {uri} ({reason}); start "
                             "it, point MLFLOW_TRACKING_URI at a running one, or leave mlflow out of --report_to")

    def create(self, run_dir, run_name, saved):
        import mlflow
        from accelerate.tracking import MLflowTracker
        same = saved and saved.get("tracking_uri") == mlflow.get_tracking_uri()
        return MLflowTracker(os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT, run_name=run_name,
                             run_id=saved["run_id"] if same else None)

    def ids(self, tracker):
        import mlflow
        return {"run_id": tracker.active_run.info.run_id, "tracking_uri": mlflow.get_tracking_uri()}

    def log_images(self, tracker, images, step):
        import mlflow
        for tag, image in images.items():
            mlflow.log_image(image, key=tag, step=step)

    def log_files(self, tracker, files):
        import mlflow
        for rel, path in files.items():
            parent = str(Path(rel).parent)
            mlflow.log_artifact(str(path), artifact_path=None if parent == "." else parent)


KINDS: dict[str, TrackerKind] = {k.name: k for k in (TensorBoard(), WandB(), MLflow())}


def unreachable(url: str, timeout: float = 5.0) -> str | None:
    """Why ``url`` gives no HTTP answer within ``timeout`` seconds (None: it answered, with any status)."""
    import urllib.error
    import urllib.request
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # an answer: the server is there
    except (urllib.error.URLError, OSError, ValueError) as e:
        return str(getattr(e, "reason", e))
    return None


def parse_report_to(values) -> list[str]:
    """``--report_to`` as a list of kinds: comma lists split, 'none' and empty entries dropped, each kind once;
    an unknown name raises ValueError."""
    import difflib
    names = []
    for v in ([values] if isinstance(values, str) else values or []):
        for name in str(v).split(","):
            name = name.strip().lower()
            if not name or name == "none" or name in names:
                continue
            if name not in KINDS:
                close = difflib.get_close_matches(name, [*KINDS, "none"], n=1)
                raise ValueError(f"--report_to: {name!r} is not one of {', '.join(KINDS)} or none"
                                 + (f" (did you mean {close[0]!r}?)" if close else ""))
            names.append(name)
    return names


def check_trackers(names: list[str]) -> None:
    """Every kind's start-up check, before any compute: its package on every process, its server from the main
    process only (the one that logs); raises ValueError with what to do."""
    from beit.runtime.faults import SetupError
    from beit.runtime.run_lock import is_main_process
    for name in names:
        try:
            KINDS[name].check(server=is_main_process())
        except ValueError as e:
            raise SetupError(str(e)) from None


def default_run_name(run_dir: str | Path) -> str:
    """The run folder's last two parts (runs/demo/pretrain -> demo/pretrain)."""
    parts = Path(run_dir).resolve().parts
    return "/".join(parts[-2:])


def plain_config(config: dict) -> dict:
    """A config as every tracker takes it: numbers, strings and booleans as they are, the rest as JSON text."""
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in config.items()}


def report_files(run_dir: Path) -> dict[str, Path]:
    """The report of ``beit viz`` in ``run_dir`` (index.html and viz/*.png), when it has been drawn."""
    run_dir = Path(run_dir)
    if not (run_dir / "index.html").is_file():
        return {}
    pictures = {f"viz/{p.name}": p for p in sorted((run_dir / "viz").glob("*.png"))}
    return {"index.html": run_dir / "index.html", **pictures}


class RunTrackers:
    """The trackers of one run, on the main process (``main=False``: none, every call does nothing)."""

    def __init__(self, names: list[str], run_dir: str | Path, run_name: str = "", main: bool = True):
        self.names = list(names) if main else []
        self.run_dir = Path(run_dir)
        self.run_name = run_name or default_run_name(run_dir)
        self.active: list[tuple[TrackerKind, object]] = []

    def __bool__(self) -> bool:
        return bool(self.names)

    def start(self, config: dict | None = None, resume: bool = False) -> None:
        """Start every tracker (a resumed run goes on in the tracker runs of ``trackers.json``) and store
        ``config``."""
        from accelerate import PartialState
        PartialState()  # Accelerate's trackers need its process state (already there inside an Accelerate run)
        saved = {}
        path = self.run_dir / TRACKERS_FILE
        if resume and path.is_file():
            saved = json.loads(path.read_text())
        ids = {}
        for name in self.names:
            kind = KINDS[name]
            tracker = kind.create(self.run_dir, self.run_name, saved.get(name))
            tracker.start()
            self.active.append((kind, tracker))
            if config is not None:
                tracker.store_init_configuration(plain_config(config))
            if kind.ids(tracker):
                ids[name] = kind.ids(tracker)
        if ids:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({**saved, **ids, "run_name": self.run_name}, indent=1))

    def log(self, values: dict, step: int) -> None:
        for _, tracker in self.active:
            tracker.log(values, step=step)

    def log_images(self, images: dict, step: int) -> None:
        """HWC uint8 arrays under their tags."""
        for kind, tracker in self.active:
            kind.log_images(tracker, images, step)

    def finish(self, summary: dict | None = None, step: int = 0, files: dict[str, Path] | None = None) -> None:
        """The final metrics (numbers of ``summary`` as ``final/<key>``), the files as artifacts, and the end."""
        final = {f"final/{k}": v for k, v in (summary or {}).items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for kind, tracker in self.active:
            if final:
                kind.log_summary(tracker, final, step)
            if files:
                kind.log_files(tracker, files)
            tracker.finish()
        self.active = []


def run_files(run_dir: str | Path, names: tuple[str, ...]) -> dict[str, Path]:
    """The files among ``names`` that the run wrote, and the report of ``beit viz`` when it is there."""
    run_dir = Path(run_dir)
    files = {n: run_dir / n for n in names if (run_dir / n).is_file()}
    return {**files, **report_files(run_dir)}


def attach_report(run_dir: str | Path, files: dict[str, Path]) -> list[str]:
    """Add ``files`` (a report drawn after the run) to the W&B and MLflow runs of ``run_dir``'s
    ``trackers.json``; returns the kinds that took them."""
    path = Path(run_dir) / TRACKERS_FILE
    saved = json.loads(path.read_text()) if path.is_file() else {}
    names = [n for n in saved if n in KINDS]
    if not names:
        return []
    uri = saved.get("mlflow", {}).get("tracking_uri")
    before = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:  # the run's own server, whatever this shell points at
        os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        check_trackers(names)
        trackers = RunTrackers(names, run_dir, run_name=saved.get("run_name", ""))
        trackers.start(resume=True)
        trackers.finish(files=files)
    finally:
        if uri and before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        elif uri:
            os.environ["MLFLOW_TRACKING_URI"] = before
    return names
