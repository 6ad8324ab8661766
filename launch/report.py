"""Write a run's report: RUN_DIR/report/index.html with a headline box, plots and tables.

    python launch/report.py runs/pretrain            # then open runs/pretrain/report/index.html
    python launch/report.py RUN_DIR --output DIR

Works for every stage's run directory (pretraining, ICT, DPR, Open-QA). The page opens with the
headline box: for pretraining, retrieval utility over the first and last quarter with 95%
confidence intervals against the null document, masked accuracy with and without retrieval,
generations used and staleness (and held-out span recall when RUN_DIR/summary.json holds the
run's summary line); for the other stages their loss and final evaluation as a table. Then the
stage's curves (raw and smoothed), RU by entity label with counts, the latest examples table
and an appendix of bookkeeping panels. The numbers of the box are also in
report/headline.json. The last stdout line is a JSON summary.
"""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run directory (a stage's train.run_dir)")
    parser.add_argument("--output", help="report directory (default RUN_DIR/report)")
    parser.add_argument("--debug", action="store_true", help="a traceback instead of one line")
    args = parser.parse_args(argv)
    import os

    from realm.fsutil import output_problem

    problem = output_problem(args.output, directory=True) if args.output else None
    if problem:  # before drawing anything
        parser.error(f"--output {args.output}: {problem}")
    from realm.cli import emit_summary, setup_logging
    from realm.errors import RunDirError, WriteError
    from realm.report import write_report

    setup_logging("INFO")
    try:
        page = write_report(args.run_dir, args.output)
    except (FileNotFoundError, RunDirError, WriteError) as err:
        if args.debug:
            raise
        print(f"report: error: {err}", file=sys.stderr)
        return 1
    images = sorted(f for f in os.listdir(os.path.dirname(page)) if f.endswith(".png"))
    emit_summary({"report": page, "images": len(images)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
