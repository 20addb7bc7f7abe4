"""DTD (Describable Textures, 47 classes): the official archive from the VGG site plus CoOp's split file.

    python data_prep/dtd.py --root $DATA

Result: $DATA/dtd/{images,imdb,labels}/ and $DATA/dtd/split_zhou_DescribableTextures.json.
"""
import sys
from common import run, move_into

ARCHIVES = [('https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz', 'fff73e5086ae6bdbea199a49dfb8a4c1', None)]
GDRIVE = {'split_zhou_DescribableTextures.json': '1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x'}


def arrange(staging, folder):
    "The archive holds dtd/{images,imdb,labels}."
    move_into(staging / 'dtd', folder)


def main(argv=None):
    return run('dtd', __doc__, archives=ARCHIVES, arrange=arrange, gdrive=GDRIVE, argv=argv)


if __name__ == '__main__':
    sys.exit(main())
