"""ImageNet (ILSVRC-2012, 1000 classes): arrange the official archives you downloaded (license: image-net.org),
verify. Nothing is downloaded by this script; the class names ship with so_tutorial (the paper's list).

    # 1. log in at https://image-net.org, download ILSVRC2012_img_train.tar (138 GB), ILSVRC2012_img_val.tar
    #    (6.3 GB) and ILSVRC2012_devkit_t12.tar.gz into one folder, say ~/ilsvrc
    # 2. extract them into the layout (md5-checked, safe extraction; about 300 GB free needed):
    python data_prep/imagenet.py --root $DATA --archives ~/ilsvrc
    # or, with train/ and val/ class folders already on disk: symlink them (README.md) and only verify:
    python data_prep/imagenet.py --root $DATA --verify-only

Result: $DATA/imagenet/images/train/<wnid>/*.JPEG and images/val/<wnid>/*.JPEG (val sorted into class folders
with the devkit's ground truth). The val folder is the test set. A CoOp classnames.txt in $DATA/imagenet/ is
not needed; when present it is compared with the shipped names (a warning lists any difference).
A flat images/val/ (the val tar extracted as is) is sorted in place with --sort-val (needs the devkit).
"""
import os, shutil, sys, tempfile
from pathlib import Path
from common import run, extract

# the official archives and their md5s (as torchvision's ImageNet dataset checks them)
ARCHIVES = {'train': ('ILSVRC2012_img_train.tar', '1d675b47d978889d74fa0da5fadfb00e'),
            'val': ('ILSVRC2012_img_val.tar', '29b22e2961454d5413ddabcf34fc5622'),
            'devkit': ('ILSVRC2012_devkit_t12.tar.gz', 'fa75699e90414af021442c21a62c3abf')}


def archive(folder, which):
    "The path of an official archive in `folder`, after checking its md5."
    from so_tutorial.io import UserError
    from torchvision.datasets.utils import check_integrity
    name, md5 = ARCHIVES[which]
    path = Path(folder) / name
    if not path.is_file(): raise UserError(f"{path} is missing; download it from image-net.org into {folder}")
    print(f'  checking the md5 of {path}')
    if not check_integrity(str(path), md5):
        raise UserError(f"{path} is damaged or not the official file (md5 differs from {md5}); download it again")
    return path


def devkit_val_wnids(devkit):
    "The wnid of each validation image (in file-name order) from the devkit's meta.mat and ground-truth file."
    from scipy.io import loadmat
    from so_tutorial.io import UserError
    with tempfile.TemporaryDirectory() as tmp:
        extract(devkit, tmp)
        data = Path(tmp) / 'ILSVRC2012_devkit_t12' / 'data'
        try:
            syn = loadmat(str(data / 'meta.mat'), squeeze_me=True)['synsets']
            truth = (data / 'ILSVRC2012_validation_ground_truth.txt').read_text().split()
        except (OSError, KeyError, ValueError) as e:
            raise UserError(f"{devkit}: not the ILSVRC-2012 devkit ({type(e).__name__}: {e}); download it again") from None
    leaf = {int(i): str(w) for i, w, kids in zip(syn['ILSVRC2012_ID'], syn['WNID'], syn['num_children']) if int(kids) == 0}
    return [leaf[int(i)] for i in truth]


def extract_train(tar, train_dir):
    "The train tar holds one tar per class: extract each into its class folder, then delete it."
    train_dir = Path(train_dir)
    extract(tar, train_dir)
    for inner in sorted(train_dir.glob('*.tar')): extract(inner, train_dir / inner.stem, remove=True)


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
    # CoOp's images/train, or CLIP-LoRA's train/ directly in imagenet/
    images = next((folder / d for d in ('images', '') if (folder / d / 'train').is_dir()), folder / 'images')
    need_train, need_val = not (images / 'train').is_dir(), not (images / 'val').is_dir()
    if (need_train or need_val or args.sort_val) and not args.archives:
        raise UserError("ImageNet needs a manual download (license): put the ILSVRC-2012 archives in a folder and pass "
                        "--archives DIR, or symlink existing train/ and val/ class folders into "
                        f"{images} (see data_prep/README.md)")
    if not args.archives: return
    arch = Path(args.archives).expanduser()
    wnids = devkit_val_wnids(archive(arch, 'devkit')) if need_val or args.sort_val else None
    if need_train: extract_train(archive(arch, 'train'), images / 'train')
    if need_val: extract(archive(arch, 'val'), images / 'val')
    if need_val or args.sort_val: sort_val(images / 'val', wnids)


def main(argv=None):
    return run('imagenet', __doc__, prepare=prepare, add_args=add_args, argv=argv)


if __name__ == '__main__':
    sys.exit(main())
