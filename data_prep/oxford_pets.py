"""Oxford-IIIT Pets (37 classes): images and annotations from the VGG site plus CoOp's split file.

    python data_prep/oxford_pets.py --root $DATA

Result: $DATA/oxford_pets/{images,annotations}/ and $DATA/oxford_pets/split_zhou_OxfordPets.json.
"""
import sys
from common import run, move_into

ARCHIVES = [('https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz', '5c4f3ee8e5d25df40f4fd59a7f44e54c', None),
            ('https://www.robots.ox.ac.uk/~vgg/data/pets/data/annotations.tar.gz', '95a8c909bbe2e81eed6a22bccdf3f68f', None)]
GDRIVE = {'split_zhou_OxfordPets.json': '1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs'}


def arrange(staging, folder):
    "The archives hold images/ and annotations/ (the annotations are not needed with CoOp's split)."
    move_into(staging / 'images', folder / 'images')
    if (staging / 'annotations').is_dir(): move_into(staging / 'annotations', folder / 'annotations')


def main(argv=None):
    return run('oxford_pets', __doc__, archives=ARCHIVES, arrange=arrange, gdrive=GDRIVE, argv=argv)


if __name__ == '__main__':
    sys.exit(main())
