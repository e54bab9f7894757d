"""``expertmesh`` command line: a thin layer over the SDK and the pipelines."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def _data_prepare(args: argparse.Namespace) -> int:
    from expertmesh.platform.config import load_config
    from expertmesh.platform.data import prepare

    cfg = load_config(args.config, args.set)
    out = prepare(cfg.data, progress=not args.no_progress)
    print(f"prepared data in {out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from expertmesh.pipelines import train

    overrides = [arg for item in args.set for arg in ("--set", item)]
    return train.main(["--config", args.config, *overrides])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expertmesh", description="Elastic MoE on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", default="configs/tiny.yaml")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")

    data = sub.add_parser("data", help="data preparation")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prep = data_sub.add_parser("prepare", help="download domains and write Parquet token shards")
    with_config(prep)
    prep.add_argument("--no-progress", action="store_true")
    prep.set_defaults(func=_data_prepare)

    tr = sub.add_parser("train", help="train a model (runs expertmesh.pipelines.train)")
    with_config(tr)
    tr.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from expertmesh.platform.errors import ExpertmeshError

        if isinstance(exc, ExpertmeshError | LookupError):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
