"""Oxford Flowers 102: images and labels from the VGG site plus CoOp's split file and class names.

    python data_prep/oxford_flowers.py --root $DATA

Result: $DATA/oxford_flowers/jpg/image_<n>.jpg, imagelabels.mat, cat_to_name.json and split_zhou_OxfordFlowers.json.
"""
import sys
from common import run, move_into

BASE = 'https://www.robots.ox.ac.uk/~vgg/data/flowers/102/'
ARCHIVES = [(BASE + '102flowers.tgz', '52808999861908f626f3c1f4e79d11fa', None)]
FILES = [(BASE + 'imagelabels.mat', 'e0620be6f572b9609742df49c70aed4d')]
GDRIVE = {'cat_to_name.json': '1AkcxCXeK_RCGCEC_GvmWxjcjaNhu-at0',
          'split_zhou_OxfordFlowers.json': '1Pp0sRXzZFZq15zVOzKjKBu4A9i01nozT'}


def arrange(staging, folder):
    "102flowers.tgz holds jpg/."
    move_into(staging / 'jpg', folder / 'jpg')


def main(argv=None):
    return run('oxford_flowers', __doc__, archives=ARCHIVES, arrange=arrange, gdrive=GDRIVE, files=FILES, argv=argv)


if __name__ == '__main__':
    sys.exit(main())
