"""Check an existing data tree: each dataset loads (folders, split files), its class and split counts match
CoOp's split files, and every image exists and opens. Names every missing or unreadable file.

    python data_prep/verify.py --root $DATA                                  # all 11 datasets, open every image
    python data_prep/verify.py --root $DATA --datasets dtd eurosat --quick   # only check that the files exist
    python data_prep/verify.py --root /tmp/fixture --no-counts               # a fixture tree (data_prep/fixtures.py)

Exit status 0 when every dataset checked is fine, 1 otherwise.
"""
import argparse, sys
from common import add_verify_args, verify, report


def main(argv=None):
    p = argparse.ArgumentParser(prog='python data_prep/verify.py', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--root', required=True, help='the data root holding one folder per dataset')
    p.add_argument('--datasets', nargs='+', metavar='KEY', help='dataset keys to check (default: all 11)')
    args = add_verify_args(p).parse_args(argv)
    from so_tutorial.data import DATASETS
    keys = args.datasets or list(DATASETS)
    unknown = [k for k in keys if k not in DATASETS]
    if unknown: p.error(f"unknown dataset(s) {', '.join(unknown)}; choose from: {', '.join(DATASETS)}")
    bad = [k for k in keys if report(k, *verify(k, args.root, quick=args.quick, counts=not args.no_counts, workers=args.workers))]
    if bad: print(f"\n{len(bad)} of {len(keys)} dataset(s) need attention: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main())
