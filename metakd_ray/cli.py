"""The ``metakd-ray`` command line.

    metakd-ray presets                             the shipped configs, one line each
    metakd-ray cp       PRESET FILE.yaml           copy a preset, comments included, to edit it
    metakd-ray validate CONFIG [key=value ...]     print the resolved config
    metakd-ray prepare  CONFIG [key=value ...]     split + tokenize, print per-domain counts
    metakd-ray teacher  CONFIG [--fresh]           train the configured teacher kind on Ray Train
    metakd-ray distill  CONFIG [--methods ...]     one student per domain as parallel Ray tasks
    metakd-ray run      CONFIG [--methods ...]     the whole pipeline, writes results.json
    metakd-ray sweep    CONFIG --space FILE        Ray Tune + Optuna search (tune_spaces/*.yaml)
    metakd-ray doctor   CONFIG [--address ...]     PASS/FAIL checks of cluster, storage, MLflow, model, data
    metakd-ray report   OUTPUT_DIR ... | --experiment NAME   accuracy tables over seeds, plots, vs the paper
    metakd-ray predict  MODEL_DIR [--file F | TEXT ...]      classify texts with a saved student or teacher
    metakd-ray export   MODEL_DIR [--int8]                   ONNX (+ int8) files, checked, with a speed table
    metakd-ray data fetch amazon|mnli [--to DIR]             download a public data set where the presets look
    metakd-ray clean    OUTPUT_DIR [--dry-run] [--models]    list and delete a run's derived caches

CONFIG is a preset (``metakd-ray presets``) or a YAML path. Overrides (``key=value``) may come
before or after the options. Bad input exits with code 2 and one ``error:`` line naming the key or
file.
"""

from __future__ import annotations

import argparse
import os
import sys

from metakd_ray.errors import MetaKDError, did_you_mean
from metakd_ray.terminal import bound_heap, quiet_environment


def _epilog() -> str:
    from metakd_ray.config import preset_names
    from metakd_ray.methods import methods_help

    return (f"presets: {', '.join(preset_names())} (metakd-ray presets)\n\n"
            f"methods (--methods takes names or aliases, comma-separated, or 'all'):\n{methods_help()}")


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    from metakd_ray import __version__

    parser = argparse.ArgumentParser(prog="metakd-ray", description="Meta-KD cross-domain distillation on Ray.",
                                     epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"metakd-ray {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show Ray's and MLflow's own log lines")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: dict[str, argparse.ArgumentParser] = {}

    def add(name: str, help_text: str, config: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=_epilog() if config else None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if config:
            p.add_argument("config", help="preset name (see `metakd-ray presets`) or path to a YAML config")
            p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
        p.add_argument("-v", "--verbose", action="store_true",
                       help="show Ray's and MLflow's own log lines (default: warnings and errors only)")
        commands[name] = p
        return p

    p = add("presets", "List the shipped configs with their first comment line.", config=False)
    p = add("cp", "Copy a preset, comments included, to a YAML file you can edit.", config=False)
    p.add_argument("preset", help="preset name (see `metakd-ray presets`)")
    p.add_argument("file", help="where to write it, e.g. my-data.yaml")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    add("validate", "Print the resolved, validated config.")
    add("prepare", "Load, dedupe, split and tokenize the data; print per-domain counts.")
    p = add("teacher", "Train the teacher (teacher.kind) with Ray Train.")
    p.add_argument("--fresh", action="store_true", help="discard an unfinished or finished run and start anew")
    for name, text in (("distill", "Distil one student per domain from trained teachers (Ray tasks)."),
                       ("run", "Run the whole pipeline and write results.json.")):
        p = add(name, text)
        p.add_argument("--methods", help="comma-separated method names or aliases, or 'all' "
                                         "(default: distill.methods); listed below")
        if name == "run":
            p.add_argument("--fresh", action="store_true", help="retrain the teachers and students from scratch")
    p = add("doctor", "Check Ray, storage, MLflow, model and data for this config (PASS/FAIL lines).")
    p.add_argument("--address", default=None, help="Ray address (default: ray.address, $RAY_ADDRESS or a local Ray)")
    p = add("sweep", "Ray Tune + Optuna (+ ASHA) search over a space in tune_spaces/.")
    p.add_argument("--space", required=True, help="search-space YAML, e.g. tune_spaces/distill.yaml")
    p.add_argument("--trials", type=int, default=8, help="number of trials (default 8)")
    p.add_argument("--concurrency", type=int, default=2, help="trials running at once (default 2)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    p.add_argument("--name", default="", help="sweep name (default: <space>-<config hash>)")
    p.add_argument("--objective", default="accuracy", help="accuracy (default) or accuracy,latency (Pareto)")
    p.add_argument("--no-asha", action="store_true", help="run every trial to the end")
    p = add("report", "Domain x method test accuracy (mean ± std over seeds) beside the paper's table, with "
                      "heatmap, size/latency, gap and training-curve plots.", config=False)
    p.add_argument("sources", nargs="*", metavar="OUTPUT_DIR",
                   help="run output directories (or their results.json, or a directory of run directories)")
    p.add_argument("--experiment", help="read every finished pipeline run of this MLflow experiment instead")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow store for --experiment (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--out", help="report directory (default: OUTPUT_DIR/report for one source, else ./report)")
    p = add("predict", "Classify texts with a saved student or teacher directory.", config=False)
    p.add_argument("model", metavar="MODEL_DIR", help="e.g. outputs/quickstart/students/meta_kd/books/model")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify")
    p.add_argument("--file", help=".txt (one text per line) or .csv/.jsonl/.parquet with a 'text' column "
                                  "('text_pair' and 'label' optional; with labels the accuracy is printed)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p = add("export", "Export a saved model to ONNX (and dynamic int8), check it against PyTorch and print a "
                      "size/latency table against its teacher.", config=False)
    p.add_argument("model", metavar="MODEL_DIR", help="e.g. outputs/quickstart/students/meta_kd/books/model")
    p.add_argument("--onnx", action="store_true", help="ONNX, the only format (the default; kept for scripts)")
    p.add_argument("--int8", action="store_true", help="also write the dynamically quantised model-int8.onnx")
    p.add_argument("--file", help="examples to check agreement on (default: the model's test split)")
    p.add_argument("--teacher", help="model directory to compare against (default: the student's teacher)")
    p.add_argument("--min-agreement", type=float, default=0.97,
                   help="least share of int8 labels that must match PyTorch (default 0.97)")
    p = add("data", "Download a public data set (checked) to where the presets look for it.", config=False)
    p.add_argument("action", choices=["fetch"], help="fetch: download and check")
    p.add_argument("dataset", choices=["amazon", "mnli"],
                   help="amazon: the Blitzer et al. 2007 reviews (sorted_data_acl); mnli: MultiNLI from the Hugging Face hub")
    p.add_argument("--to", metavar="DIR", help="data root to write into (default: $METAKD_DATA_ROOT, else ./data)")
    p.add_argument("--url", help="another source: a mirror's URL or a local file of the archive (amazon), or a "
                                 "hub id or local dataset directory (mnli)")
    p = add("clean", "List a run's derived caches (token cache, teacher outputs, checkpoints, general student) "
                     "with their sizes and delete them; results, teachers and students are kept.", config=False)
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="a run's output directory, e.g. outputs/quickstart")
    p.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    p.add_argument("--models", action="store_true", help="also delete the teachers' and students' model directories")
    return parser, commands


def parse(argv: list[str]) -> argparse.Namespace:
    """Options and ``key=value`` overrides in any order (argparse's intermixed parsing, per command);
    ``-v`` may also come before the command."""
    parser, commands = _parser()
    verbose = False
    while argv and argv[0] in ("-v", "--verbose"):
        verbose, argv = True, argv[1:]
    if argv and argv[0] in commands:
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
        args.verbose = args.verbose or verbose
        return args
    if argv and not argv[0].startswith("-"):
        parser.error(f"unknown command {argv[0]!r}{did_you_mean(argv[0], commands)} "
                     f"(expected one of: {', '.join(commands)})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else list(argv))
    if args.verbose:
        os.environ["METAKD_VERBOSE"] = "1"
    quiet_environment()
    bound_heap()
    try:
        return _dispatch(args)
    except MetaKDError as exc:
        if args.verbose and exc.__cause__ is not None:
            import traceback

            traceback.print_exception(exc.__cause__)
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        import errno

        # pyarrow's write errors carry the errno in their text only
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT) and "No space left on device" not in str(exc):
            raise
        print(f"error: no space left on the device{f' writing {exc.filename}' if exc.filename else ''}: free some "
              "(`metakd-ray clean OUTPUT_DIR` deletes a run's caches) and run the command again; what was "
              "finished is kept", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        return 130


def _dispatch(args) -> int:
    from metakd_ray.config import dump_yaml, load_config

    if args.command == "report":
        return _report(args)
    if args.command in ("presets", "cp"):
        return _presets(args)
    if args.command in ("predict", "export"):
        return _deploy(args)
    if args.command == "data":
        from metakd_ray.fetch import fetch

        fetch(args.dataset, args.to, args.url)
        return 0
    if args.command == "clean":
        return _clean(args)
    cfg = load_config(args.config, args.overrides)
    if args.command == "validate":
        print(dump_yaml(cfg), end="")
        return 0
    if args.command == "prepare":
        from metakd_ray.data.prepare import prepare
        from metakd_ray.distill import planned_signals

        data = prepare(cfg)
        print(planned_signals(cfg, data, cfg.distill.methods).line)
        print(f"splits: {cfg.out / 'splits.json'}")
        return 0

    if args.command == "doctor":
        from metakd_ray.doctor import run_doctor

        return 0 if run_doctor(cfg, args.address or cfg.ray.address or os.environ.get("RAY_ADDRESS")) else 1
    if args.command == "sweep":
        from metakd_ray.tune import sweep

        sweep(cfg, args.space, args.trials, args.concurrency, resume=args.resume, name=args.name,
              objective=args.objective, asha=not args.no_asha)
        return 0

    from metakd_ray.pipeline import resolve_methods, run_pipeline

    if args.command == "teacher":
        from metakd_ray.methods import methods_from

        run_pipeline(cfg, methods_from(cfg.teacher.kind)[:1], fresh=args.fresh, teachers_only=True)
        return 0
    methods = resolve_methods(args.methods, cfg)
    run_pipeline(cfg, methods, fresh=getattr(args, "fresh", False), require_teachers=args.command == "distill")
    return 0


def _presets(args) -> int:
    from pathlib import Path

    from metakd_ray.config import PRESET_DIR, preset_names
    from metakd_ray.io import atomic_write_text

    if args.command == "presets":
        for name in preset_names():
            first = (PRESET_DIR / f"{name}.yaml").read_text(encoding="utf-8").splitlines()[0]
            print(f"{name:<12} {first.lstrip('# ').removeprefix(name + ':').strip()}")
        return 0
    if args.preset not in preset_names():
        raise MetaKDError(f"cp: unknown preset {args.preset!r}{did_you_mean(args.preset, preset_names())} "
                          f"(presets: {', '.join(preset_names())})")
    target = Path(args.file)
    if target.exists() and not args.force:
        raise MetaKDError(f"cp: {target} exists (pass --force to overwrite it)")
    atomic_write_text(target, (PRESET_DIR / f"{args.preset}.yaml").read_text(encoding="utf-8"))
    print(f"wrote {target}: edit it, then `metakd-ray validate {target}`")
    return 0


def _deploy(args) -> int:
    from pathlib import Path

    from metakd_ray.deploy import export, predict

    if args.command == "predict":
        if bool(args.texts) == bool(args.file):
            raise MetaKDError("predict: give either TEXT arguments or --file F")
        predict(Path(args.model), args.texts, Path(args.file) if args.file else None, args.json)
        return 0
    export(Path(args.model), args.int8, Path(args.file) if args.file else None,
           Path(args.teacher) if args.teacher else None, args.min_agreement)
    return 0


def _clean(args) -> int:
    from pathlib import Path

    from metakd_ray.io import text_table
    from metakd_ray.outputs import derived_outputs, remove_outputs

    out = Path(args.output_dir)
    if not (out / "results.json").is_file() and not (out / "splits.json").is_file():
        raise MetaKDError(f"clean: {out} is not a metakd-ray output directory (no results.json or splits.json)")
    found = derived_outputs(out, args.models)
    if not found:
        print(f"{out}: nothing to clean")
        return 0
    print(text_table(["path", "MB", "what it is"], [[str(p.relative_to(out)), f"{size / 1e6:.1f}", what]
                                                     for p, size, what in found], [34, 10, 60]))
    total = sum(size for _, size, _ in found) / 1e6
    if args.dry_run:
        print(f"would free {total:.1f} MB (run without --dry-run to delete)")
        return 0
    remove_outputs([p for p, _, _ in found])
    print(f"freed {total:.1f} MB; a later run rebuilds what it needs")
    return 0


def _report(args) -> int:
    from pathlib import Path

    from metakd_ray.report import build_report, load_results, load_results_from_mlflow

    if bool(args.sources) == bool(args.experiment):
        raise MetaKDError("report: give either OUTPUT_DIR(s) or --experiment NAME")
    if args.experiment:
        if not args.tracking_uri:
            raise MetaKDError("report --experiment: no MLflow store (pass --tracking-uri or set MLFLOW_TRACKING_URI)")
        results = load_results_from_mlflow(args.experiment, args.tracking_uri)
        default = Path(f"report-{args.experiment}")
    else:
        results = load_results(args.sources)
        one = Path(args.sources[0])
        default = (one if one.is_dir() else one.parent) / "report" if len(args.sources) == 1 else Path("report")
    build_report(results, Path(args.out) if args.out else default)
    return 0


if __name__ == "__main__":
    sys.exit(main())
