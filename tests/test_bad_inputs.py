"""Hostile inputs, each through the real command (a subprocess of ``launch/*.py``): the exit code
(1; 2 for usage and config), exactly one error line on stderr naming the file, key or path, no
traceback, and nothing half-written (what the command was writing is absent, or as it was).

A full disk is simulated inside the command's own process (:data:`FULL_DISK`): ``open`` returns,
for paths containing a given fragment, a file whose ``write`` raises ``ENOSPC``. The cases that
resume a pretraining run (made by a real two-step run) or start one on a spans corpus are slow.
"""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"

#: ``python -c FULL_DISK FRAGMENT SCRIPT ARGS...``: SCRIPT run as ``__main__`` with a full disk
#: under every path that contains FRAGMENT.
FULL_DISK = textwrap.dedent("""
    import builtins, errno, io, runpy, sys
    fragment, script = sys.argv[1], sys.argv[2]
    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self._f = f
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device", self._f.name)
        def __getattr__(self, name):
            return getattr(self._f, name)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self._f.close()

    def full_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return Full(f) if fragment in str(file) and set(mode) & set("wax+") else f

    builtins.open = io.open = full_open
    sys.argv = [script, *sys.argv[3:]]
    runpy.run_path(script, run_name="__main__")
""")

REFRESH = ["--no-progress", "--once", "refresh.threads=1", "refresh.heartbeat_timeout_s=0"]
ERROR_LINE = re.compile(r"\bERROR\b|: error: ")


@dataclasses.dataclass
class Case:
    """What a command is run on (``setup(tmp, fx)`` returns its arguments: a launch script and
    its flags), what it must end in, and what it must leave as it was."""

    setup: Callable[[Path, dict], list[str]]
    code: int
    names: tuple[str, ...]  # in the one error line ("{tmp}" is the test's directory)
    kept: tuple[str, ...] = ()  # paths under tmp whose files must be as before the command
    full: Optional[str] = None  # run under FULL_DISK with this fragment ("{tmp}" expanded)
    warns: bool = False  # exit 0: no error line, a warning line names it (a corrupt cache)
    after: Optional[Callable[[Path], None]] = None  # more checks of what was left
    needs: tuple[str, ...] = ("leads_corpus", "tiny_retriever")  # fixtures the setup reads


def _files(root: Path) -> dict[str, str]:
    """Every non-empty file under ``root`` (locks, leases and logs aside) and its content hash:
    what a command may not have half-written."""
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()} if root.stat().st_size else {}
    out = {}
    for path in sorted(root.rglob("*")) if root.exists() else []:
        rel = path.relative_to(root).as_posix()
        if (path.is_file() and path.stat().st_size and not rel.endswith((".lock", ".log"))
                and "readers/" not in rel and not rel.startswith(("wandb", "heartbeat"))):
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _env(tmp: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}


# --------------------------------------------------------------------------------------------
# setups: a run directory with an encoder snapshot, a generation, metrics...


def _snapshot(run: Path, retriever: str, step: int = 0) -> None:
    shutil.copytree(retriever, run / "snapshots" / f"step-{step:06d}")
    (run / "snapshots" / "LATEST").write_text(json.dumps({"step": step,
                                                         "path": f"step-{step:06d}"}))


def _refresh(tmp: Path, fx: dict, *extra: str) -> list[str]:
    return [str(LAUNCH / "refresh_index.py"), "--run-dir", str(tmp / "run"), "--corpus",
            fx["leads_corpus"], *REFRESH, *extra]


def escaping_pointer(tmp, fx):
    (tmp / "run" / "snapshots").mkdir(parents=True)
    (tmp / "run" / "snapshots" / "LATEST").write_text('{"step": 0, "path": "../../elsewhere"}')
    return _refresh(tmp, fx)


def generation_lacking_a_key(tmp, fx):
    import numpy as np

    from realm.data.store import BlockStore
    from realm.refresh.rundir import RunStore

    _snapshot(tmp / "run", fx["tiny_retriever"])
    corpus = BlockStore(fx["leads_corpus"])
    store = RunStore(str(tmp / "run"))
    store.commit_generation(np.ones((len(corpus), 16), np.float32), encoder_step=0,
                            corpus_fingerprint=corpus.fingerprint)
    manifest = tmp / "run" / "index" / "gen-000000" / "manifest.json"
    manifest.write_text(json.dumps({k: v for k, v in json.loads(manifest.read_text()).items()
                                    if k != "encoder_step"}))
    return _refresh(tmp, fx)


def rebuilt(tmp):
    """The refresher re-embedded: LATEST names a new, complete generation."""
    latest = json.loads((tmp / "run" / "index" / "LATEST").read_text())
    assert latest["generation"] == 1 and latest["encoder_step"] == 0


def publish_from(tmp, fx):
    return _refresh(tmp, fx, "--retriever", fx["tiny_retriever"])


def no_temp_left(tmp):
    for sub in ("snapshots", "index"):
        where = tmp / "run" / sub
        hidden = [p.name for p in where.iterdir() if p.name.startswith(".")
                  and not p.name.endswith(".lock")] if where.exists() else []
        assert hidden == [], hidden


def shards_kept(tmp):
    """Nothing committed and no temp file left; the shards embedded so far are kept in the
    generation in progress, for the next try to resume (docs/refresh.md)."""
    no_temp_left(tmp)
    index = tmp / "run" / "index"
    assert not (index / "LATEST").exists() and not list(index.glob("gen-*"))
    (build,) = (index / "building").iterdir()
    assert not [p.name for p in build.iterdir() if p.name.startswith(".")]


def a_file(tmp):
    (tmp / "a-file").write_text("a regular file\n")


def run_file_under_a_file(tmp, fx):
    a_file(tmp)
    (tmp / "qa.jsonl").write_text('{"question": "who", "answers": ["x"]}\n')
    return [str(LAUNCH / "evaluate.py"), "retrieval", "--bm25", "--corpus", fx["leads_corpus"],
            "--qa", str(tmp / "qa.jsonl"), "--run-file", str(tmp / "a-file" / "run.trec")]


def answers_under_a_file(tmp, fx):
    a_file(tmp)
    (tmp / "qa.jsonl").write_text('{"question": "who", "answers": ["x"]}\n')
    return [str(LAUNCH / "answer.py"), "--model", str(tmp / "model"), "--qa",
            str(tmp / "qa.jsonl"), "--output", str(tmp / "a-file" / "answers.jsonl")]


def run_file_on_a_full_disk(tmp, fx):
    (tmp / "qa.jsonl").write_text('{"question": "who", "answers": ["x"]}\n')
    (tmp / "out").mkdir()
    (tmp / "out" / "run.trec").write_text("an earlier run file\n")
    return [str(LAUNCH / "evaluate.py"), "retrieval", "--bm25", "--corpus", fx["leads_corpus"],
            "--qa", str(tmp / "qa.jsonl"), "--run-file", str(tmp / "out" / "run.trec")]


def no_temp_beside_outputs(tmp):
    assert sorted(p.name for p in (tmp / "out").iterdir()) == ["run.trec"]


def latest_lacking_generation(tmp, fx):
    generation_lacking_a_key(tmp, fx)
    latest = tmp / "run" / "index" / "LATEST"
    latest.write_text(json.dumps({k: v for k, v in json.loads(latest.read_text()).items()
                                  if k != "generation"}))
    return _refresh(tmp, fx)


def _metrics(run: Path, tail: bytes = b"") -> None:
    run.mkdir(parents=True)
    lines = [json.dumps({"step": s, "time": 0.0, "loss": 1.0 / s}).encode() for s in (1, 2)]
    (run / "metrics.jsonl").write_bytes(b"\n".join(lines) + b"\n" + tail)


def report_under_a_file(tmp, fx):
    a_file(tmp)
    _metrics(tmp / "run")
    return [str(LAUNCH / "report.py"), str(tmp / "run"), "--output", str(tmp / "a-file" / "r")]


def report_of_non_utf8_metrics(tmp, fx):
    _metrics(tmp / "run", b'{"step": 3, "loss": 0.2, "note": "\xff\xfe"}\n')
    return [str(LAUNCH / "report.py"), str(tmp / "run")]


def _pretrain(tmp: Path, fx: dict, corpus: str, *extra: str) -> list[str]:
    return [str(LAUNCH / "pretrain.py"), "--no-progress", f"corpus={corpus}",
            f"pretrain.retriever={fx['tiny_retriever']}", f"pretrain.encoder={fx['tiny_encoder']}",
            "pretrain.encoder_layers=null", "pretrain.k=2", "pretrain.mlm_steps=0",
            "pretrain.reader_type=masked_lm",
            "pretrain.max_joined_tokens=96", f"cache_dir={tmp / 'cache'}",
            "retriever.max_query_tokens=24", "retriever.max_block_tokens=64",
            f"train.run_dir={tmp / 'run'}", "train.steps=2", "train.batch_size=2",
            "train.save_every=2", "train.precision=fp32", "refresh.every_steps=2",
            "refresh.lag_steps=0", "refresh.poll_s=0.1", "refresh.threads=1", "logging.log_every=1",
            "logging.report_every=0", "logging.wandb=false", *extra]


def run_dir_under_a_file(tmp, fx):
    a_file(tmp)
    return _pretrain(tmp, fx, fx["leads_corpus"], f"train.run_dir={tmp / 'a-file' / 'run'}")


def second_trainer(tmp, fx):
    from realm.fsutil import FileLock

    lock = FileLock(str(tmp / "run" / ".trainer.lock"))
    lock.acquire()  # held by this test process until its end (the fixture's finaliser)
    fx["finalisers"].append(lock.release)
    return _pretrain(tmp, fx, fx["leads_corpus"])


# slow: a pretraining run of two steps (checkpoint, snapshots, generations), resumed to four


def _resume(tmp, fx, spoil: Callable[[Path], None]):
    shutil.copytree(fx["pretrained"], tmp / "run")
    spoil(tmp / "run")
    return _pretrain(tmp, fx, fx["spans_corpus"], "train.steps=4")


def resume_escaping_pointer(tmp, fx):
    def spoil(run):
        (run / "snapshots" / "LATEST").write_text('{"step": 2, "path": "../../elsewhere"}')
    return _resume(tmp, fx, spoil)


def resume_generations_lacking_a_key(tmp, fx):
    def spoil(run):
        for manifest in run.glob("index/gen-*/manifest.json"):
            manifest.write_text(json.dumps({k: v for k, v in json.loads(
                manifest.read_text()).items() if k != "encoder_step"}))
    return _resume(tmp, fx, spoil)


def resumed_on_a_rebuilt_generation(tmp):
    """LATEST names a generation this run built (the spoiled ones came from the first run's
    encoder steps 0 and 2): of the resumed step-2 encoder, or of step 4 when the refresher got to
    it before the run's DONE (a race the run does not wait on), with a whole manifest."""
    latest = json.loads((tmp / "run" / "index" / "LATEST").read_text())
    manifest = json.loads((tmp / "run" / "index" / f"gen-{latest['generation']:06d}"
                           / "manifest.json").read_text())
    assert latest["encoder_step"] in (2, 4) and manifest["encoder_step"] == latest["encoder_step"]
    assert (tmp / "run" / "checkpoints" / "step-000004").is_dir()


def resume_malformed_training_state(tmp, fx):
    def spoil(run):
        (run / "checkpoints" / "step-000002" / "training_state.json").write_text('{"core": ')
    return _resume(tmp, fx, spoil)


def fresh_pretrain(tmp, fx):
    return _pretrain(tmp, fx, fx["spans_corpus"])


SLOW = pytest.mark.slow
TRAINER = ("leads_corpus", "tiny_retriever", "tiny_encoder")
SPANS = ("spans_corpus", "tiny_retriever", "tiny_encoder")
RESUMED = (*SPANS, "pretrained")
CASES = {
    # snapshots/LATEST naming a path outside the run: refused (it was: a ValueError traceback)
    "refresh-snapshots-LATEST-escapes": Case(
        escaping_pointer, 1, ("{tmp}/run/snapshots/LATEST", "'../../elsewhere'",
                              "refused as corrupt"), kept=("run",)),
    # a generation's manifest lacking a key is a corrupt generation: rejected and rebuilt
    "refresh-generation-manifest-lacks-key": Case(
        generation_lacking_a_key, 0, ("{tmp}/run/index/gen-000000/manifest.json",
                                      "lacks 'encoder_step'"),
        kept=("run/index/gen-000000", "run/snapshots"), warns=True, after=rebuilt),
    "refresh-disk-full-publishing": Case(
        publish_from, 1, ("publishing encoder snapshot {tmp}/run/snapshots/step-000000 failed: "
                          "no space left on the device", "snapshots/LATEST is unchanged"),
        kept=("run",), full="/snapshots/", after=no_temp_left),
    "refresh-disk-full-generation": Case(
        publish_from, 1, ("writing an index generation under {tmp}/run/index failed: no space "
                          "left on the device", "nothing was committed"),
        kept=("run/index/LATEST",), full="/index/.gen-", after=shards_kept),
    "refresh-disk-full-shards": Case(
        publish_from, 1, ("writing an index generation under {tmp}/run/index failed: no space "
                          "left on the device", "nothing was committed"),
        kept=("run/index/LATEST",), full="/index/building/", after=shards_kept),
    "refresh-disk-full-metrics": Case(
        publish_from, 1, ("{tmp}/run/refresher/metrics.jsonl failed: no space left on the "
                          "device",), kept=("run/refresher",), full="refresher/metrics.jsonl"),
    "evaluate-run-file-under-a-file": Case(
        run_file_under_a_file, 2, ("--run-file {tmp}/a-file/run.trec", "{tmp}/a-file is a "
                                   "regular file, not a directory"), kept=("a-file",)),
    # a full disk while writing a run file: one line, the earlier file kept, no temp left
    "evaluate-disk-full-run-file": Case(
        run_file_on_a_full_disk, 1, ("writing the run file {tmp}/out/run.trec failed: no space "
                                     "left on the device", "{tmp}/out/run.trec is unchanged"),
        kept=("out",), full="run.trec.tmp-", after=no_temp_beside_outputs),
    # index/LATEST without its generation: one line naming the file and key (was a KeyError)
    "refresh-index-LATEST-lacks-key": Case(
        latest_lacking_generation, 1, ("{tmp}/run/index/LATEST", "lacks 'generation'"),
        kept=("run",)),
    "answer-output-under-a-file": Case(
        answers_under_a_file, 2, ("--output {tmp}/a-file/answers.jsonl", "{tmp}/a-file is a "
                                  "regular file"), kept=("a-file",)),
    "report-output-under-a-file": Case(
        report_under_a_file, 2, ("--output {tmp}/a-file/r", "{tmp}/a-file is a regular file"),
        kept=("a-file", "run")),
    "report-metrics-not-utf8": Case(
        report_of_non_utf8_metrics, 1, ("{tmp}/run/metrics.jsonl: line 3 is not UTF-8",),
        kept=("run",)),
    # (first pass) a run directory under a regular file; a second trainer on one run directory
    "pretrain-run-dir-under-a-file": pytest.param(Case(
        run_dir_under_a_file, 1, ("train.run_dir={tmp}/a-file/run: cannot write .trainer.lock",),
        kept=("a-file",), needs=TRAINER), marks=SLOW),  # (in-process: tests/training/)
    "pretrain-second-trainer": Case(
        second_trainer, 1, ("{tmp}/run/.trainer.lock: another trainer holds it",
                            f"pid {os.getpid()} on host"), kept=("run",), needs=TRAINER),
    "pretrain-resume-snapshots-LATEST-escapes": pytest.param(Case(
        resume_escaping_pointer, 1, ("{tmp}/run/snapshots/LATEST", "'../../elsewhere'"),
        kept=("run/snapshots", "run/checkpoints", "run/index/gen-000000", "run/metrics.jsonl"),
        needs=RESUMED), marks=SLOW),
    # the KeyError: 'encoder_step' of a resume: the corrupt generations rejected, one rebuilt
    "pretrain-resume-generations-lack-key": pytest.param(Case(
        resume_generations_lacking_a_key, 0, ("/run/index/gen-00000", "lacks 'encoder_step'"),
        kept=("run/index/gen-000000",), warns=True, after=resumed_on_a_rebuilt_generation,
        needs=RESUMED), marks=SLOW),
    "pretrain-resume-malformed-training-state": pytest.param(Case(
        resume_malformed_training_state, 1, (
            "{tmp}/run/checkpoints/step-000002/training_state.json: malformed JSON",),
        kept=("run/checkpoints", "run/snapshots", "run/metrics.jsonl"), needs=RESUMED),
        marks=SLOW),
    "pretrain-disk-full-publishing": pytest.param(Case(
        fresh_pretrain, 1, ("publishing encoder snapshot {tmp}/run/snapshots/step-000000 failed: "
                            "no space left on the device",), kept=("run/snapshots",),
        full="/run/snapshots/", after=no_temp_left, needs=SPANS), marks=SLOW),
    "pretrain-disk-full-metrics": pytest.param(Case(
        fresh_pretrain, 1, ("appending a record of step 1 to {tmp}/run/metrics.jsonl failed: no "
                            "space left on the device",), kept=("run/metrics.jsonl",),
        full="{tmp}/run/metrics.jsonl", needs=SPANS), marks=SLOW),
}


@pytest.fixture(scope="module")
def pretrained(spans_corpus, tiny_retriever, tiny_encoder, tmp_path_factory):
    """A pretraining run of two steps: checkpoint step-000002, snapshots, generations."""
    tmp = tmp_path_factory.mktemp("pretrained")
    fx = {"tiny_retriever": tiny_retriever, "tiny_encoder": tiny_encoder}
    done = subprocess.run([sys.executable, *_pretrain(tmp, fx, spans_corpus)], cwd=tmp,
                          capture_output=True, text=True, timeout=600, env=_env(tmp))
    assert done.returncode == 0, done.stderr[-3000:]
    return str(tmp / "run")


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
def test_a_bad_input_is_one_line_naming_it_and_nothing_is_half_written(case, tmp_path, request):
    fx = {"finalisers": [], **{name: request.getfixturevalue(name) for name in case.needs}}
    try:
        argv = case.setup(tmp_path, fx)
        before = {k: _files(tmp_path / k) for k in case.kept}
        prefix = [sys.executable] if case.full is None else [
            sys.executable, "-c", FULL_DISK, case.full.format(tmp=tmp_path)]
        done = subprocess.run(prefix + argv, cwd=tmp_path, capture_output=True, text=True,
                              timeout=600, env=_env(tmp_path))
    finally:
        for release in fx["finalisers"]:
            release()
    tail = done.stderr[-4000:]
    assert done.returncode == case.code, tail
    assert "Traceback" not in done.stderr, tail
    errors = [line for line in done.stderr.splitlines() if ERROR_LINE.search(line)]
    names = [n.format(tmp=tmp_path) for n in case.names]
    if case.warns:
        assert errors == [], tail
        warnings = [line for line in done.stderr.splitlines() if "WARNING" in line
                    and all(n in line for n in names)]
        assert warnings, tail
    else:
        assert len(errors) == 1, tail
        assert all(n in errors[0] for n in names), (names, errors[0])
    for k in case.kept:
        assert _files(tmp_path / k) == before[k], k
    if case.after is not None:
        case.after(tmp_path)
