"""ImageNet (ILSVRC-2012, 1000 classes): arrange the official archives you downloaded (license: image-net.org),
fetch CoOp's classnames.txt, verify. Nothing is downloaded from image-net.org by this script.

    # 1. log in at https://image-net.org, download ILSVRC2012_img_train.tar (138 GB), ILSVRC2012_img_val.tar
    #    (6.3 GB) and ILSVRC2012_devkit_t12.tar.gz into one folder, say ~/ilsvrc
    # 2. extract them into the layout (torchvision's ImageNet helpers; md5-checked; about 300 GB free needed):
    python data_prep/imagenet.py --root $DATA --archives ~/ilsvrc
    # or, with train/ and val/ class folders already on disk: symlink them (README.md) and only verify:
    python data_prep/imagenet.py --root $DATA --verify-only

Result: $DATA/imagenet/images/train/<wnid>/*.JPEG, images/val/<wnid>/*.JPEG (val sorted into class folders
with the devkit's ground truth) and $DATA/imagenet/classnames.txt. The val folder is the test set.
A flat images/val/ (the val tar extracted as is) is sorted in place with --sort-val (needs the devkit).
"""
import os, shutil, sys
from pathlib import Path
from common import run, fetch_gdrive

CLASSNAMES_ID = '1-61f_ol79pViBFDG_IDlUQSwoLcn2XXF'


def sort_val(val_dir, wnids):
    "Move the flat val images (sorted by name) into one folder per class; `wnids[i]` is the class of the i-th image."
    from so_tutorial.io import UserError
    val_dir = Path(val_dir)
    images = sorted(e.name for e in os.scandir(val_dir) if e.is_file() and not e.name.startswith('.'))
    if len(images) != len(wnids):
        raise UserError(f"{val_dir} holds {len(images)} images but the devkit lists {len(wnids)}; extract "
                        f"ILSVRC2012_img_val.tar again (or use --archives)")
    for w in sorted(set(wnids)): (val_dir / w).mkdir(exist_ok=True)
    for name, w in zip(images, wnids): shutil.move(str(val_dir / name), str(val_dir / w / name))


def add_args(p):
    p.add_argument('--archives', help='folder with ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz')
    p.add_argument('--sort-val', action='store_true', help='sort a flat images/val/ into class folders (needs the devkit in --archives)')


def prepare(args, folder):
    from so_tutorial.io import UserError
    from torchvision.datasets import imagenet as tvi
    # CoOp's images/train, or CLIP-LoRA's train/ directly in imagenet/
    images = next((folder / d for d in ('images', '') if (folder / d / 'train').is_dir()), folder / 'images')
    need_train, need_val = not (images / 'train').is_dir(), not (images / 'val').is_dir()
    if (need_train or need_val or args.sort_val) and not args.archives:
        raise UserError("ImageNet needs a manual download (license): put the ILSVRC-2012 archives in a folder and pass "
                        "--archives DIR, or symlink existing train/ and val/ class folders into "
                        f"{images} (see data_prep/README.md)")
    if args.archives:
        arch = Path(args.archives).expanduser()
        if not (arch / tvi.META_FILE).is_file(): tvi.parse_devkit_archive(str(arch))  # md5-checked
        if need_train: tvi.parse_train_archive(str(arch), folder=str((images / 'train').resolve()))
        if need_val: tvi.parse_val_archive(str(arch), folder=str((images / 'val').resolve()))
        elif args.sort_val: sort_val(images / 'val', tvi.load_meta_file(str(arch))[1])
    fetch_gdrive(CLASSNAMES_ID, folder, 'classnames.txt')


def main(argv=None):
    return run('imagenet', __doc__, prepare=prepare, add_args=add_args, argv=argv)


if __name__ == '__main__':
    sys.exit(main())
