"""Food-101 (101 classes): the archive from ETH Zurich plus CoOp's split file.

    python data_prep/food101.py --root $DATA

Result: $DATA/food-101/{images,meta}/ and $DATA/food-101/split_zhou_Food101.json (5 GB archive).
"""
import sys
from common import run, move_into

ARCHIVES = [('http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz', '85eeb15f3717b99a5da872d97d918f87', None)]
GDRIVE = {'split_zhou_Food101.json': '1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl'}


def arrange(staging, folder):
    "The archive holds food-101/{images,meta,README.txt,license_agreement.txt}."
    move_into(staging / 'food-101', folder)


def main(argv=None):
    return run('food101', __doc__, archives=ARCHIVES, arrange=arrange, gdrive=GDRIVE, argv=argv)


if __name__ == '__main__':
    sys.exit(main())
