"""FGVC-Aircraft (100 variants): the 2013b archive from the VGG site; CoOp reads its own split files (no json).

    python data_prep/fgvc.py --root $DATA

Result: $DATA/fgvc_aircraft/images/<id>.jpg, variants.txt and images_variant_{train,val,test}.txt
(the archive's data/ folder, renamed).
"""
import sys
from common import run, move_into, find_dir

ARCHIVES = [('https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz', None, None)]


def arrange(staging, folder):
    "The archive holds fgvc-aircraft-2013b/data/{images,variants.txt,images_variant_*.txt,...}."
    move_into(find_dir(staging, 'data', 'variants.txt') or staging / 'fgvc-aircraft-2013b' / 'data', folder)


def main(argv=None):
    return run('fgvc', __doc__, archives=ARCHIVES, arrange=arrange, argv=argv)


if __name__ == '__main__':
    sys.exit(main())
