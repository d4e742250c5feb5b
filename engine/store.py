"""``python -m engine.store``: inspect or verify a teacher embedding store built by engine.precompute."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import USER_ERROR_STATUS, HelpFormatter, one_line, run_command
from .core.errors import ConfigError
from .data.datacompdr import read_config
from .teachers.default import pair_teachers, teacher_weights
from .teachers.store import describe, read_manifest, verify
from .teachers.viewcheck import BF16_VIEW_TOLERANCE, VIEW_TOLERANCE, verify_shard_views, verify_views


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.store", description="Inspect or verify a teacher "
                                "embedding store built by engine.precompute.", formatter_class=HelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    about_info = "Print the manifest: each teacher (fingerprint, width, logit scale), the rows' width, parts."
    info = commands.add_parser("info", help=about_info, description=about_info, formatter_class=HelpFormatter)
    info.add_argument("store", help="store directory")
    about_verify = ("Check everything training checks (manifest fields and logit scale, dtypes, shapes, checksums, "
                    "finiteness, unique keys) and more (key hashes, unit-norm rows); with --train-data, also that "
                    "each shard is the one its part was built from, sample by sample.")
    check = commands.add_parser("verify", help=about_verify, description=about_verify, formatter_class=HelpFormatter)
    check.add_argument("store", help="store directory")
    check.add_argument("--train-data", default=None,
                       help="webdataset shards (brace-expandable, '::'-separated) to check sample by sample")
    about_views = ("Replay random stored views of a reinforced store, or of DataCompDR shards, from their parameters, "
                   "embed them again with each teacher and compare with the stored embeddings; one line per teacher "
                   "of an ensemble; exit status 2 when a teacher's worst cosine error (1 - cosine) exceeds "
                   f"{VIEW_TOLERANCE:.3g} (fp16 rounding gives at most 1.2e-07; DataCompDR's bf16 pth.gz rows: "
                   f"{BF16_VIEW_TOLERANCE:.3g}).")
    views = commands.add_parser("verify-views", help=about_views, description=about_views,
                                formatter_class=HelpFormatter)
    views.add_argument("store", help="store directory, or a pattern of DataCompDR shards (brace-expandable, "
                       "'::'-separated; local, pipe: or http(s)://) with --teacher and --teacher-pretrained")
    views.add_argument("--samples", type=int, default=100, help="stored views to replay (a store: drawn at random, "
                       "every one when it holds fewer; shards: the views of samples of the shards in a random order)")
    views.add_argument("--train-data", default=None, help="a store: the shards it was built from (default: the data "
                       "its manifest records)")
    views.add_argument("--teacher", action="append", default=None, metavar="MODEL",
                       help="DataCompDR shards: the open_clip model of each teacher whose rows they carry, repeated "
                       "in the rows' order (a store names its own)")
    views.add_argument("--teacher-pretrained", action="append", default=None, metavar="TAG_OR_FILE",
                       help="DataCompDR shards: the weights of each --teacher, in the same order")
    views.add_argument("--dataset-reinforcement-config", default=None,
                       help="DataCompDR shards: the reinforcement config whose random_resized_crop size the views' "
                       "translations were drawn for (default: the first teacher's image size)")
    views.add_argument("--seed", type=int, default=0, help="seed of the views' draw")
    return p


def inspect_store(argv=None) -> None:
    args = parser().parse_args(argv)
    if args.command == "info":
        print(describe(args.store))
        return
    if args.command == "verify-views":
        checks = check_views(args)
        for k, check in enumerate(checks):  # one line per teacher; an error on stderr, as verify's
            member = f"teacher {k + 1} {check.teacher}: " if len(checks) > 1 else ""
            print(f"{'OK' if check.ok else 'error'}: {args.store}: {member}{check.checked} stored view(s) replayed; "
                  f"worst cosine error {check.worst:.3g} ({check.where}); tolerance {check.tolerance:.3g}",
                  file=sys.stdout if check.ok else sys.stderr)
        if not all(check.ok for check in checks):
            raise SystemExit(USER_ERROR_STATUS)
        return
    problems = verify(args.store, args.train_data)
    if problems:  # a report, one error line per problem on stderr (the exit status of a user's error)
        print("\n".join(f"error: {one_line(problem)}" for problem in problems), file=sys.stderr)
        raise SystemExit(USER_ERROR_STATUS)
    manifest = read_manifest(args.store)
    checked = f"; every sample of {args.train_data} matches" if args.train_data else ""
    teachers = [member["fingerprint"] for member in manifest["teachers"]]
    print(f"OK: {args.store}: {manifest['count']} samples in {len(manifest['parts'])} part(s), "
          f"{'teacher' if len(teachers) == 1 else 'teachers'} {', '.join(teachers)}{checked}")


def check_views(args) -> list:
    """verify-views on a store directory (its own teachers), or on DataCompDR shards (the teachers given)."""
    shard_flags = [flag for flag, value in (("--teacher", args.teacher), ("--teacher-pretrained",
                                                                           args.teacher_pretrained),
                                            ("--dataset-reinforcement-config", args.dataset_reinforcement_config))
                   if value]
    if (Path(args.store) / "manifest.json").exists():
        if shard_flags:
            raise ConfigError(f"{shard_flags[0]}: {args.store} is a store, which names its own teachers and views' "
                              f"size; the flag is for DataCompDR shards")
        return verify_views(args.store, args.samples, args.train_data, args.seed)
    if not args.teacher:
        raise ConfigError(f"{args.store}: not a store directory (no manifest.json); for DataCompDR shards pass "
                          f"--teacher and --teacher-pretrained, once per teacher in the rows' order")
    if args.train_data:
        raise ConfigError("--train-data: DataCompDR shards are the positional argument")
    teachers = [(model, teacher_weights(model, pretrained))
                for model, pretrained in pair_teachers(args.teacher, args.teacher_pretrained or [])]
    reference = read_config(args.dataset_reinforcement_config) if args.dataset_reinforcement_config else None
    return verify_shard_views(args.store, teachers, args.samples, reference, args.seed)


def main(argv=None) -> None:
    run_command(inspect_store, argv)


if __name__ == "__main__":
    main()
