"""UCF101 (101 actions, one middle frame per video): CoOp's UCF-101-midframes.zip and split file (Google Drive).

    python data_prep/ucf101.py --root $DATA

Result: $DATA/ucf101/UCF-101-midframes/<Action_Name>/*.jpg and $DATA/ucf101/split_zhou_UCF101.json.
The frames exist only as CoOp's zip (extracting them from the videos would give different images).
"""
import sys
from common import run, move_into, find_dir

ARCHIVES = [('gdrive:10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O', None, 'UCF-101-midframes.zip')]
GDRIVE = {'split_zhou_UCF101.json': '1I0S0q91hJfsV9Gf4xDIjgDq4AqBNJb1y'}


def arrange(staging, folder):
    "The zip holds UCF-101-midframes/<Action_Name>/."
    move_into(find_dir(staging, 'UCF-101-midframes') or staging / 'UCF-101-midframes', folder / 'UCF-101-midframes')


def main(argv=None):
    return run('ucf101', __doc__, archives=ARCHIVES, arrange=arrange, gdrive=GDRIVE, argv=argv)


if __name__ == '__main__':
    sys.exit(main())
