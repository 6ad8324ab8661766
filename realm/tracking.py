"""Metrics go through one small interface: a JSONL file always, wandb and TensorBoard when enabled.

Only the main process logs (pass ``enabled=False`` elsewhere). wandb and TensorBoard are imported
lazily, the first time a tracker that uses them is built, so the library never needs them to
import. TensorBoard's event files go to ``RUN_DIR/tensorboard`` (``tensorboard --logdir RUN_DIR``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
import uuid
from typing import Any, Optional

from realm.errors import ConfigError, RunDirError
from realm.fsutil import write_errors

logger = logging.getLogger(__name__)


def _clean(value: Any) -> Any:
    """Plain JSON values: tensors and numpy scalars become floats, NaN/inf become None."""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


#: The x axis of every wandb chart: the trainer's optimizer step (the refresher logs the step of
#: the snapshot it embedded), so that one group's runs line up.
STEP_METRIC = "trainer_step"

#: File in a tracker's directory naming its wandb run: id (reused on resume), group, name.
RUN_FILE = "wandb_run.json"

#: Folder of a run directory holding TensorBoard's event files.
TENSORBOARD_DIR = "tensorboard"

#: The one line given when TensorBoard is asked for but not installed.
TENSORBOARD_MISSING = ("logging.trackers: tensorboard needs the tensorboard package, which is not "
                       "installed: pip install tensorboard")


def tensorboard_writer(directory: str, purge_step: Optional[int] = None):
    """A ``torch.utils.tensorboard.SummaryWriter`` writing event files into ``directory``.

    ``purge_step``: events of this step and later, written before (by a run that was killed and
    is resumed from an earlier checkpoint), are hidden from TensorBoard.

    Raises:
        ConfigError: the tensorboard package is not installed (one line naming the command).
    """
    try:
        from torch.utils.tensorboard import SummaryWriter  # lazy: only runs that ask pay for it
    except ImportError:
        raise ConfigError(TENSORBOARD_MISSING) from None
    return SummaryWriter(log_dir=directory, purge_step=purge_step)


def wandb_run_identity(directory: str, name: Optional[str], group: Optional[str]
                       ) -> dict[str, Any]:
    """The wandb run of a tracker directory: its id is made once and kept in ``RUN_FILE``, so
    that a resumed run continues the same wandb run instead of opening a new one."""
    path = os.path.join(directory, RUN_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            run_id = json.load(f).get("id")
    except (FileNotFoundError, json.JSONDecodeError):
        run_id = None
    identity = {"id": run_id or uuid.uuid4().hex[:16], "group": group, "name": name}
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(identity, f)
    os.replace(tmp, path)  # whole or absent
    return identity


#: File in a run directory naming its wandb group, shared by the trainer and its refresher.
GROUP_FILE = "wandb_group"


def wandb_group(run_dir: str) -> str:
    """The wandb group of a run directory: its name and a random suffix, made once by whichever
    process asks first (the trainer or its refresher) and kept in ``GROUP_FILE``, so that two
    runs in directories of the same name (every default ``runs/pretrain``) never share a group,
    and a resumed run keeps its own. A remote run directory: its name alone."""
    name = os.path.basename(os.path.abspath(run_dir.rstrip("/"))) if "://" not in run_dir \
        else run_dir.rstrip("/").rsplit("/", 1)[-1]
    if "://" in run_dir:
        return name
    path = os.path.join(run_dir, GROUP_FILE)
    os.makedirs(run_dir, exist_ok=True)
    try:
        with open(path, "x", encoding="utf-8") as f:  # the first asker writes it, whole
            group = f"{name}-{uuid.uuid4().hex[:6]}"
            f.write(group + "\n")
            return group
    except FileExistsError:
        for _ in range(50):  # the other process may be between creating and writing it
            with open(path, encoding="utf-8") as f:
                group = f.read().strip()
            if group:
                return group
            time.sleep(0.02)
        return name


def offline_sync_command(run_dir: str) -> Optional[str]:
    """``wandb sync TRAINER_RUN REFRESHER_RUN``: one command that uploads a run's offline wandb
    runs, the trainer's and its refresher's (found by the ids their ``RUN_FILE`` keep, beside
    the metrics or under ``WANDB_DIR``), or None when there are none."""
    import glob

    roots = [os.environ["WANDB_DIR"]] if os.environ.get("WANDB_DIR") else []
    found = []
    for where in (run_dir, os.path.join(run_dir, "refresher")):
        try:
            with open(os.path.join(where, RUN_FILE), encoding="utf-8") as f:
                run_id = json.load(f)["id"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        runs = [r for root in (*roots, where)
                for r in glob.glob(os.path.join(root, "wandb", f"offline-run-*-{run_id}"))]
        if runs:
            found.append(max(runs, key=os.path.getmtime))  # a resumed run: its newest part
    return "wandb sync " + " ".join(found) if found else None


class Tracker:
    """Log scalar metrics to ``metrics.jsonl`` (and wandb, and TensorBoard) in a run directory.

    Args:
        run_dir: Directory of the run; ``metrics.jsonl`` is appended to.
        config: The resolved config (a dict) given to wandb.
        wandb: Also log to wandb.
        wandb_project: wandb project name.
        wandb_mode: ``online``, ``offline`` or ``disabled``.
        run_name: Name of the wandb run.
        group: wandb group (the run directory's name: a trainer and its refresher together).
        enabled: False on non-main processes: every call is then a no-op.
        tensorboard: Also write TensorBoard event files into ``RUN_DIR/tensorboard``.

    Raises:
        ConfigError: ``tensorboard`` is asked for and the package is not installed.
    """

    def __init__(self, run_dir: str, config: Optional[dict] = None, wandb: bool = False,
                 wandb_project: str = "realm", wandb_mode: str = "offline",
                 run_name: Optional[str] = None, group: Optional[str] = None,
                 enabled: bool = True, tensorboard: bool = False) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self._wandb = None
        self._file = None
        self._tensorboard = None
        if not enabled:
            return
        if tensorboard:  # (first: a missing package leaves nothing behind)
            self._tensorboard = tensorboard_writer(os.path.join(run_dir, TENSORBOARD_DIR))
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._file = open(self.path, "ab", buffering=0)
        if wandb:
            import wandb as wandb_lib  # lazy: only runs that ask for wandb pay for it

            # a user's WANDB_DIR wins; else wandb's files go beside the metrics
            where = os.environ.get("WANDB_DIR") or run_dir
            identity = wandb_run_identity(run_dir, run_name, group)
            self._wandb = wandb_lib.init(
                project=wandb_project, mode=wandb_mode, name=run_name, group=group,
                id=identity["id"], resume="allow", config=config or {},
                reinit="finish_previous", dir=where)
            # one x axis for every metric, the trainer's step, also across a resumed run and
            # the refresher's run in the same group
            self._wandb.define_metric(STEP_METRIC)
            self._wandb.define_metric("*", step_metric=STEP_METRIC)

    @classmethod
    def from_config(cls, config, enabled: bool = True,
                    run_name: Optional[str] = None) -> "Tracker":
        """The tracker of a :class:`realm.config.Config`: its ``train.run_dir`` and ``logging``
        section (``logging.wandb``, ``logging.trackers``); the wandb run is named after the run
        directory unless ``run_name`` is given."""
        lg, run_dir = config.logging, config.train.run_dir
        name = os.path.basename(os.path.abspath(run_dir))
        group = wandb_group(run_dir) if lg.wandb and enabled else name
        return cls(run_dir, config.to_dict(), wandb=lg.wandb, wandb_project=lg.wandb_project,
                   wandb_mode=lg.wandb_mode, run_name=run_name or name, group=group,
                   enabled=enabled, tensorboard="tensorboard" in lg.trackers)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Append one record ``{"step", "time", **metrics}``."""
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3)}
        record.update({k: _clean(v) for k, v in metrics.items()})
        self._append(record)
        if self._wandb is not None:
            self._wandb.log({STEP_METRIC: step, **{k: v for k, v in record.items()
                                                    if k not in ("step", "time")}})
        if self._tensorboard is not None:  # the numbers only (TensorBoard scalars are float32)
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) \
                        and not isinstance(value, bool):
                    self._tensorboard.add_scalar(key, value, step, walltime=record["time"])

    def _append(self, record: dict[str, Any]) -> None:
        """One line, written whole or not at all (a failed write is cut back off the file).

        Raises:
            WriteError: the line cannot be written (a full disk...), in one line naming the file.
        """
        data = memoryview((json.dumps(record) + "\n").encode())
        fd = self._file.fileno()
        with write_errors(f"appending a record of step {record.get('step')} to {self.path}",
                          self.run_dir, "the records before it are kept"):
            size = os.fstat(fd).st_size
            try:
                while data:
                    data = data[self._file.write(data):]
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise

    def truncate_after(self, step: int) -> int:
        """Drop the records of steps after ``step`` (a run resumed from its checkpoint at
        ``step`` logs them again; a killed run had logged them once already). The file is
        replaced atomically. Returns the number of records dropped."""
        if not self.enabled or not os.path.exists(self.path):
            return 0
        self._file.close()
        kept, dropped = [], 0
        with open(self.path, "rb") as f:
            for line in f:
                try:
                    later = json.loads(line).get("step", 0) > step
                except (ValueError, AttributeError, TypeError):
                    later = False  # a torn last line of a killed run: not ours to judge; kept
                    if not line.endswith(b"\n"):
                        line += b"\n"
                dropped += later
                if not later:
                    kept.append(line)
        if dropped:
            tmp = f"{self.path}.tmp-{os.getpid()}"
            with write_errors(f"cutting {self.path} back to step {step}", self.run_dir,
                              "the file is unchanged"):
                try:
                    with open(tmp, "wb") as f:
                        f.writelines(kept)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, self.path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
            logger.info("%s: dropped %d records of steps after %d (logged again on resume)",
                        self.path, dropped, step)
            if self._tensorboard is not None:  # TensorBoard hides its events of those steps
                self._tensorboard.close()
                self._tensorboard = tensorboard_writer(
                    os.path.join(self.run_dir, TENSORBOARD_DIR), purge_step=step + 1)
        self._file = open(self.path, "ab", buffering=0)
        return dropped

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """A small table of examples: a JSONL record with the rows, a wandb Table, and a markdown
        table in TensorBoard's text tab."""
        if not self.enabled:
            return
        self._append({"step": step, "table": name, "columns": columns,
                      "rows": [[_clean(v) for v in r] for r in rows]})
        if self._wandb is not None:
            import wandb as wandb_lib

            self._wandb.log({STEP_METRIC: step,
                             name: wandb_lib.Table(columns=columns, data=rows)})
        if self._tensorboard is not None:  # a markdown table in TensorBoard's text tab
            lines = ["| " + " | ".join(map(str, columns)) + " |",
                     "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(str(_clean(v)).replace("|", "\\|") for v in r) + " |"
                      for r in rows]
            self._tensorboard.add_text(name, "\n".join(lines), step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """The scalar records of a run's ``metrics.jsonl`` (tables left out; a last line torn by a
    kill mid-write too).

    Raises:
        RunDirError: a line is not UTF-8 or not a JSON record (the message names file and line).
    """
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path, "rb") as f:
        lines = f.readlines()
    records = []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise RunDirError(f"{path}: line {n} is not UTF-8 ({e.reason} at byte {e.start}): "
                              "not a metrics file realm wrote") from None
        except ValueError as e:
            if n == len(lines) and not raw.endswith(b"\n"):
                break  # torn by a kill mid-write
            raise RunDirError(f"{path}: line {n} is not a JSON record ({e})") from None
        if not isinstance(record, dict):
            raise RunDirError(f"{path}: line {n} is not a JSON object")
        if "table" not in record:
            records.append(record)
    return records
