"""The commands in README.md and docs/ run as written.

Every ``python launch/X.py ...`` / ``accelerate launch ... launch/X.py ...`` line in a code block
is checked without running the work: a config-driven stage resolves its config (the file and
every override) with ``--print-config``; ``evaluate.py`` parses with its own subcommand parser.
The cheap ones run for real: the quickstart's Python snippet that reads a block store.
"""

import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CONFIG_STAGES = {"pretrain", "ict", "adapt_mlm", "train_retriever", "finetune_openqa",
                 "prepare_corpus", "refresh_index"}
COMMAND = re.compile(r"^(?:accelerate launch(?: --\S+(?: \d+)?)* |python )launch/([a-z_]+)\.py"
                     r"(.*)$")


def _code_blocks(text):
    return re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", text, flags=re.S)


def _commands():
    """(doc, script, args) for each launch command in a code block; lines with shell variables
    or elisions (``$S``, ``...``) are left out."""
    out = []
    for doc in DOCS:
        for block in _code_blocks(doc.read_text(encoding="utf-8")):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#.*$", "", line).strip()
                line = re.sub(r"\s+", " ", line)
                m = COMMAND.match(line)
                if not m or "$" in line or "..." in line or "[" in line:
                    continue
                out.append((doc.name, m.group(1), shlex.split(m.group(2))))
    return out


COMMANDS = _commands()


def test_the_docs_have_commands_to_check():
    scripts = {script for _, script, _ in COMMANDS}
    assert {"pretrain", "finetune_openqa", "evaluate", "prepare_corpus"} <= scripts
    assert all((REPO / "launch" / f"{s}.py").is_file() for s in scripts), scripts


@pytest.mark.parametrize("doc,script,args",
                         [c for c in COMMANDS if c[1] in CONFIG_STAGES],
                         ids=lambda v: v if isinstance(v, str) else None)
@pytest.mark.slow
def test_stage_commands_resolve_their_config(doc, script, args, tmp_path):
    if script == "refresh_index" and "--run-dir" not in args:
        args = [*args, "--run-dir", str(tmp_path / "run")]
    done = subprocess.run([sys.executable, str(REPO / "launch" / f"{script}.py"), *args,
                           "--print-config"], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert done.returncode == 0, f"{doc}: launch/{script}.py {' '.join(args)}\n{done.stderr}"
    assert "seed:" in done.stdout


@pytest.fixture(scope="module")
def evaluate_parser():
    return runpy.run_path(str(REPO / "launch" / "evaluate.py"))["build_parser"]()


@pytest.mark.parametrize("doc,script,args", [c for c in COMMANDS if c[1] == "evaluate"],
                         ids=lambda v: v if isinstance(v, str) else None)
def test_evaluate_commands_parse(doc, script, args, evaluate_parser, capsys):
    try:
        parsed = evaluate_parser.parse_args(args)
    except SystemExit:
        pytest.fail(f"{doc}: launch/evaluate.py {' '.join(args)}\n{capsys.readouterr().err}")
    assert parsed.mode in ("openqa", "retrieval", "ict", "spans", "compare")


def test_quickstart_python_snippet_reads_a_block_store(leads_corpus, tmp_path):
    text = (REPO / "docs" / "quickstart.md").read_text(encoding="utf-8")
    [snippet] = [s for s in re.findall(r"```python\n(.*?)```", text, flags=re.S)
                 if "BlockStore" in s]
    snippet = (snippet.replace('"runs/corpus/leads.parquet"', repr(str(tmp_path / "l.parquet")))
               .replace('"runs/corpus/leads"', repr(leads_corpus)))
    done = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    first = done.stdout.splitlines()[0].split()
    assert int(first[0]) > 300 and first[1] == "sentence-transformers/all-MiniLM-L6-v2"
    assert (tmp_path / "l.parquet").stat().st_size > 10_000


def test_quickstart_search_snippet_searches_in_three_lines(leads_corpus, tiny_retriever, tmp_path):
    """The quickstart's Searcher lines, on a tiny retriever over the lead sections' corpus."""
    text = (REPO / "docs" / "quickstart.md").read_text(encoding="utf-8")
    [snippet] = [s for s in re.findall(r"```python\n(.*?)```", text, flags=re.S)
                 if "Searcher" in s]
    assert len(snippet.strip().splitlines()) == 3
    snippet = snippet.replace('Searcher.from_pretrained("runs/pretrain")',
                              f"Searcher.from_pretrained({str(tiny_retriever)!r}, "
                              f"corpus={str(leads_corpus)!r})")
    assert "corpus=" in snippet
    done = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    hits = eval(done.stdout.strip().splitlines()[-1])  # [(title, score), ...]
    assert len(hits) == 3 and all(isinstance(t, str) and isinstance(x, float) for t, x in hits)
    assert [x for _, x in hits] == sorted((x for _, x in hits), reverse=True)
