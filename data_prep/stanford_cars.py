"""Stanford Cars (196 classes): a manual download (the Stanford link is gone) arranged here, plus CoOp's split file.

    # 1. download the images by hand (README.md, "Stanford Cars"), e.g. Kaggle's stanford-cars-dataset
    # 2. point this script at the download (a folder or an archive):
    python data_prep/stanford_cars.py --root $DATA --from ~/Downloads/stanford-cars-dataset.zip

Result: $DATA/stanford_cars/cars_train/<nnnnn>.jpg, cars_test/<nnnnn>.jpg and split_zhou_StanfordCars.json
(CoOp's split names images relative to stanford_cars/, e.g. cars_train/00001.jpg). Mirrors nest the folders
differently (Kaggle has cars_train/cars_train/); any layout works as long as it has folders named cars_train
and cars_test holding the original numbered jpgs. Check the result with --verify-only (it runs anyway).
"""
import shutil, sys
from pathlib import Path
from common import run, extract, find_dir, move_into, fetch_gdrive, has_images

GDRIVE = {'split_zhou_StanfordCars.json': '1ObCFbaAgVu0I-k_Au-gIUcefirdAuizT'}
EXTRAS = ('devkit', 'car_devkit', 'cars_test_annos_withlabels.mat')  # not needed with CoOp's split; kept if present


def arrange(source, folder, link=False):
    "Move (or symlink) the cars_train/ and cars_test/ folders holding the jpgs from `source` into the dataset folder."
    from so_tutorial.io import UserError
    folder.mkdir(parents=True, exist_ok=True)
    for name in ('cars_train', 'cars_test'):
        src = find_dir(source, name, None)
        while src is not None and (src / name).is_dir(): src = src / name  # Kaggle nests cars_train/cars_train/
        if src is None or not any(src.glob('*.jpg')):
            raise UserError(f"no folder {name}/ with .jpg images below {source}; see data_prep/README.md (Stanford Cars)")
        dst = folder / name
        if dst.exists(): continue
        if link: dst.symlink_to(src.resolve(), target_is_directory=True)
        else: move_into(src, dst)
    for extra in EXTRAS:
        hit = next(iter(sorted(Path(source).rglob(extra))), None)
        if hit is None or (folder / hit.name).exists(): continue
        if hit.is_dir(): shutil.copytree(hit, folder / hit.name)
        else: shutil.copy2(hit, folder / hit.name)


def add_args(p):
    p.add_argument('--from', dest='source', help='the manual download: a folder or an archive (zip/tar) holding cars_train and cars_test')
    p.add_argument('--link', action='store_true', help='symlink the image folders from --from (a folder) instead of moving them')


def prepare(args, folder):
    from so_tutorial.io import UserError
    root = Path(args.root).expanduser()
    if not has_images('stanford_cars', folder):
        if not args.source:
            raise UserError("the Stanford Cars images must be downloaded by hand (the official link is gone): see "
                            "data_prep/README.md (Stanford Cars), then rerun with --from <the download>")
        source = Path(args.source).expanduser()
        if not source.exists(): raise UserError(f"--from {source} does not exist")
        if source.is_file():
            staging = root / '_staging' / 'stanford_cars'
            if staging.exists(): shutil.rmtree(staging)
            extract(source, staging)
            arrange(staging, folder)
            shutil.rmtree(staging)
        else: arrange(source, folder, link=args.link)
    for filename, file_id in GDRIVE.items(): fetch_gdrive(file_id, folder, filename)


def main(argv=None):
    return run('stanford_cars', __doc__, prepare=prepare, add_args=add_args, argv=argv)


if __name__ == '__main__':
    sys.exit(main())
