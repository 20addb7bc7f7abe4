"""EuroSAT (RGB, 10 classes): the archive torchvision uses (the original DFKI link is dead) plus CoOp's split file.

    python data_prep/eurosat.py --root $DATA

Result: $DATA/eurosat/2750/<Class>/<Class>_<n>.jpg and $DATA/eurosat/split_zhou_EuroSAT.json.
The archive is the torchgeo copy on Hugging Face (md5-checked). Zenodo's EuroSAT_RGB.zip (record 7711810)
works too: download it by hand and pass `--archive EuroSAT_RGB.zip`.
"""
import sys
from common import run, move_into, find_dir

ARCHIVES = [('https://huggingface.co/datasets/torchgeo/eurosat/resolve/c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip',
             'c8fa014336c82ac7804f0398fcb19387', None)]
GDRIVE = {'split_zhou_EuroSAT.json': '1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o'}


def arrange(staging, folder):
    "The archive holds 2750/<Class>/ (torchgeo, the original) or EuroSAT_RGB/<Class>/ (Zenodo): either becomes 2750/."
    src = find_dir(staging, '2750') or find_dir(staging, 'EuroSAT_RGB') or staging / '2750'
    move_into(src, folder / '2750')


def main(argv=None):
    return run('eurosat', __doc__, archives=ARCHIVES, arrange=arrange, gdrive=GDRIVE, argv=argv)


if __name__ == '__main__':
    sys.exit(main())
