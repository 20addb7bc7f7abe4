"""Write a tiny fake data tree in the documented layout (so_tutorial.data.write_fixture_tree): a few classes per
dataset, split files in their real formats, 32x32 images coloured by class. For tests and dry runs without
downloading anything.

    python data_prep/fixtures.py --root /tmp/fixture
    python data_prep/verify.py --root /tmp/fixture --no-counts
"""
import argparse, sys
import common  # noqa: F401  (puts the repository on sys.path)


def main(argv=None):
    p = argparse.ArgumentParser(prog='python data_prep/fixtures.py', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--root', required=True, help='where to write the tree')
    p.add_argument('--datasets', nargs='+', metavar='KEY', help='dataset keys (default: all 11)')
    p.add_argument('--n-classes', type=int, default=3, help='classes per dataset (default 3)')
    p.add_argument('--per-class', type=int, nargs=3, default=(4, 2, 2), metavar=('TRAIN', 'VAL', 'TEST'),
                   help='images per class in train, val and test (default 4 2 2)')
    p.add_argument('--layout', choices=('coop', 'clip-lora'), default='coop',
                   help="folder names: CoOp's (documented) or CLIP-LoRA's aliases")
    args = p.parse_args(argv)
    from so_tutorial.data import write_fixture_tree
    from so_tutorial.io import UserError
    try: folders = write_fixture_tree(args.root, args.datasets, args.n_classes, tuple(args.per_class), args.layout)
    except UserError as e:
        print(f'fixtures: error: {e}', file=sys.stderr)
        return 1
    for key, folder in folders.items(): print(f'{key:15s} {folder}')
    print(f'\ncheck it with: python data_prep/verify.py --root {args.root} --no-counts')
    return 0


if __name__ == '__main__':
    sys.exit(main())
