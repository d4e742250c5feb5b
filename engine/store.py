"""``python -m engine.store``: inspect or verify a teacher embedding store built by engine.precompute."""
from __future__ import annotations

import argparse
import sys

from .cli import USER_ERROR_STATUS, HelpFormatter, one_line, run_command
from .teachers.store import describe, read_manifest, verify
from .teachers.viewcheck import VIEW_TOLERANCE, verify_views


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
    about_views = ("Replay random stored views of a reinforced store from their parameters, embed them again with "
                   "each of the store's teachers and compare with its stored embeddings; one line per teacher of an "
                   "ensemble; exit status 2 when a teacher's worst cosine error (1 - cosine) exceeds "
                   f"{VIEW_TOLERANCE:.3g} (fp16 rounding gives at most 1.2e-07).")
    views = commands.add_parser("verify-views", help=about_views, description=about_views,
                                formatter_class=HelpFormatter)
    views.add_argument("store", help="store directory")
    views.add_argument("--samples", type=int, default=100, help="stored views to replay, drawn at random (at least "
                       "the store's count of views: every one)")
    views.add_argument("--train-data", default=None, help="the shards the store was built from (default: the data "
                       "its manifest records)")
    views.add_argument("--seed", type=int, default=0, help="seed of the views' draw")
    return p


def inspect_store(argv=None) -> None:
    args = parser().parse_args(argv)
    if args.command == "info":
        print(describe(args.store))
        return
    if args.command == "verify-views":
        checks = verify_views(args.store, args.samples, args.train_data, args.seed)
        for k, check in enumerate(checks):  # one line per teacher; an error on stderr, as verify's
            member = f"teacher {k + 1} {check.teacher}: " if len(checks) > 1 else ""
            print(f"{'OK' if check.ok else 'error'}: {args.store}: {member}{check.checked} stored view(s) replayed; "
                  f"worst cosine error {check.worst:.3g} ({check.where}); tolerance {VIEW_TOLERANCE:.3g}",
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


def main(argv=None) -> None:
    run_command(inspect_store, argv)


if __name__ == "__main__":
    main()
