"""SUN397 (397 classes): the archive from Princeton plus CoOp's split file.

    python data_prep/sun397.py --root $DATA

Result: $DATA/sun397/SUN397/<letter>/<class>/*.jpg and $DATA/sun397/split_zhou_SUN397.json (37 GB archive).
The Princeton link (also used by torchvision) is often slow or down; README.md lists what to do then
(download SUN397.tar.gz by hand from any copy and pass `--archive SUN397.tar.gz`; the md5 printed by
`md5sum` should be 8ca2778205c41d23104230ba66911c7a).
"""
import sys
from common import run, move_into, find_dir

ARCHIVES = [('http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz', '8ca2778205c41d23104230ba66911c7a', None)]
GDRIVE = {'split_zhou_SUN397.json': '1y2RD81BYuiyvebdN-JymPfyWYcd8_MUq'}


def arrange(staging, folder):
    "The archive holds SUN397/{a,b,...}/<class>/ plus ClassName.txt and README.txt."
    move_into(find_dir(staging, 'SUN397') or staging / 'SUN397', folder / 'SUN397')


def main(argv=None):
    return run('sun397', __doc__, archives=ARCHIVES, arrange=arrange, gdrive=GDRIVE, argv=argv)


if __name__ == '__main__':
    sys.exit(main())
