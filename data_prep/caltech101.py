"""Caltech-101 (100 classes in CoOp's split): the archive from Caltech's data repository plus CoOp's split file.

    python data_prep/caltech101.py --root $DATA

Result: $DATA/caltech-101/101_ObjectCategories/<class>/image_<n>.jpg and $DATA/caltech-101/split_zhou_Caltech101.json.
The old vision.caltech.edu link in CoOp's DATASETS.md is gone; data.caltech.edu serves caltech-101.zip, which
holds 101_ObjectCategories.tar.gz (extracted here) and the annotations (not needed).
"""
import sys
from common import run, extract, find_dir, move_into

ARCHIVES = [('https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip', '3138e1922a9193bfa496528edbbc45d0', None)]
GDRIVE = {'split_zhou_Caltech101.json': '1hyarUivQE36mY6jSomru6Fjd-JzwcCzN'}


def arrange(staging, folder):
    "caltech-101.zip holds caltech-101/101_ObjectCategories.tar.gz; an extracted 101_ObjectCategories/ is used as is."
    inner = next(iter(sorted(staging.rglob('101_ObjectCategories.tar.gz'))), None)
    if inner is not None: extract(inner, staging / '_inner')
    src = find_dir(staging, '101_ObjectCategories') or staging / '101_ObjectCategories'
    move_into(src, folder / '101_ObjectCategories')


def main(argv=None):
    return run('caltech101', __doc__, archives=ARCHIVES, arrange=arrange, gdrive=GDRIVE, argv=argv)


if __name__ == '__main__':
    sys.exit(main())
