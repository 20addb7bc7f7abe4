"""Shared code of the data_prep scripts: the command line, downloads (torchvision's utilities), safe extraction,
arranging, verifying.

Every `data_prep/<key>.py` does the same four things: download the official archives (skipped when the
images are already in place), arrange them into the CoOp layout documented in `data_prep/README.md`,
fetch CoOp's split file, and verify the tree (`so_tutorial.data.load_splits`, the published class and
split counts, and every image). Heavy imports happen inside functions, so `--help` is instant.
"""
import argparse, importlib.util, os, shutil, sys, tarfile, zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path: sys.path.insert(0, str(REPO))  # so_tutorial importable from a checkout

README = 'data_prep/README.md'


# ------------------------------------------------------------------------------------------- command line

def add_verify_args(p):
    "The options shared by every script that verifies."
    p.add_argument('--quick', action='store_true', help='only check that every image file exists (do not open it)')
    p.add_argument('--no-counts', action='store_true',
                   help="do not compare class and split counts with CoOp's (for fixture trees and subsets)")
    p.add_argument('--workers', type=int, default=8, help='threads that open images while verifying (default 8)')
    return p


def parser(key, doc, downloads=True):
    "The command line of `data_prep/<key>.py`; `downloads=False` for the manual datasets (their own options)."
    p = argparse.ArgumentParser(prog=f'python data_prep/{key}.py', description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--root', required=True, help='the data root: the dataset goes to ROOT/<its folder> (see README)')
    p.add_argument('--verify-only', action='store_true', help='download nothing; only check the existing tree')
    if not downloads: return add_verify_args(p)
    p.add_argument('--downloads', help='folder for the downloaded archives (default ROOT/_downloads); a complete '
                                       'archive already there is reused, not downloaded again')
    p.add_argument('--remove-archives', action='store_true', help='delete each archive once it is extracted')
    p.add_argument('--archive', action='append', metavar='FILE',
                   help='extract this local archive instead of downloading (repeat for several); for dead links and '
                        'manual downloads (see README)')
    return add_verify_args(p)


def run(key, doc, *, archives=(), arrange=None, gdrive=None, files=(), prepare=None, add_args=None, argv=None):
    """Parse the command line, prepare the dataset (unless `--verify-only`), verify it; return the exit code.

    `archives`: (url or 'gdrive:<id>', md5 or None, filename or None) extracted together into a staging folder,
    then `arrange(staging, folder)` moves their content into the dataset folder; `files`: (url, md5) downloaded
    as they are into the dataset folder; `gdrive`: {filename: Google Drive id} fetched into the dataset folder
    (CoOp's split files); `prepare(args, folder)` replaces all of that for manual datasets."""
    p = parser(key, doc, downloads=prepare is None)
    if add_args: add_args(p)
    args = p.parse_args(argv)
    from so_tutorial.io import UserError
    try:
        if not args.verify_only:
            folder = dataset_folder(key, args.root)
            if prepare: prepare(args, folder)
            else: standard_prepare(key, args, folder, archives, arrange, gdrive or {}, files)
        summary, problems = verify(key, args.root, quick=args.quick, counts=not args.no_counts, workers=args.workers)
    except UserError as e:
        print(f'{key}: error: {e}', file=sys.stderr)
        return 1
    except (OSError, RuntimeError) as e:  # network errors, integrity check failures, full disks
        print(f'{key}: error: {type(e).__name__}: {e}\nIf an official link is dead, {README} documents a workaround; '
              f'after a manual download, rerun with the archive in the downloads folder.', file=sys.stderr)
        return 1
    return report(key, summary, problems)


# ------------------------------------------------------------------------------------------- folders

def spec_of(key):
    from so_tutorial.data import DATASETS
    return DATASETS[key]


def dataset_folder(key, root):
    "The existing dataset folder (CoOp name first, then CLIP-LoRA's aliases), else the CoOp one."
    spec, root = spec_of(key), Path(root).expanduser()
    return next((root / f for f in spec.folders if (root / f).is_dir()), root / spec.folders[0])


def has_images(key, folder):
    "Whether the dataset folder already holds its image folder."
    spec = spec_of(key)
    return any((Path(folder) / d / spec.probe).is_dir() for d in spec.image_dirs)


def downloads_dir(args):
    d = Path(args.downloads or Path(args.root) / '_downloads').expanduser()
    d.mkdir(parents=True, exist_ok=True)
    return d


def move_into(src, dst):
    "Move folder `src` to `dst`; when `dst` exists, move the entries of `src` into it (existing entries are kept)."
    from so_tutorial.io import UserError
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise UserError(f'expected the folder {src} after extracting the archive (did the archive layout change? see {README})')
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(src), str(dst))
        return dst
    for e in sorted(src.iterdir()):
        t = dst / e.name
        if not t.exists(): shutil.move(str(e), str(t))
        elif e.is_dir() and t.is_dir(): move_into(e, t)
    return dst


def find_dir(top, name, must_contain=None):
    "The shallowest folder called `name` below `top` (that contains `must_contain`, when given), or None."
    top = Path(top)
    for d, subs, _ in sorted(os.walk(top), key=lambda w: (w[0].count(os.sep), w[0])):
        if Path(d).name == name and d != str(top) and (must_contain is None or (Path(d) / must_contain).exists()):
            return Path(d)
    return None


# ------------------------------------------------------------------------------------------- downloads

def fetch(url, dest_dir, md5=None, filename=None, verify_md5=True):
    "Download `url` (or 'gdrive:<id>') into `dest_dir` unless a complete copy (or any copy: `verify_md5=False`) is there."
    from torchvision.datasets.utils import download_url, check_integrity
    dest_dir = Path(dest_dir); dest_dir.mkdir(parents=True, exist_ok=True)
    filename = filename or url.rsplit('/', 1)[-1]
    path = dest_dir / filename
    if path.is_file() and (check_integrity(str(path), md5) or not verify_md5):
        print(f'  have {path}')
        return path
    print(f'  downloading {url} -> {path}')
    if url.startswith('gdrive:'): fetch_gdrive(url[len('gdrive:'):], dest_dir, filename, md5)
    else: download_url(url, str(dest_dir), filename, md5)
    return path


def fetch_gdrive(file_id, dest_dir, filename, md5=None):
    "Fetch a Google Drive file (CoOp hosts its split files there) with torchvision's helper, which needs gdown."
    from so_tutorial.io import UserError
    path = Path(dest_dir) / filename
    if path.is_file(): return path
    if importlib.util.find_spec('gdown') is None:
        raise UserError(f"{filename} comes from Google Drive (id {file_id}), which needs gdown: `pip install gdown`, "
                        f"or download https://drive.google.com/file/d/{file_id} by hand into {dest_dir}")
    from torchvision.datasets.utils import download_file_from_google_drive
    print(f'  fetching {filename} from Google Drive (id {file_id}) -> {dest_dir}')
    download_file_from_google_drive(file_id, str(dest_dir), filename, md5)
    return path


# ------------------------------------------------------------------------------------------- extracting

HAS_DATA_FILTER = hasattr(tarfile, 'data_filter')  # Python >= 3.12, 3.11.4, 3.10.12, 3.9.17


def _unsafe(archive, member, why):
    from so_tutorial.io import UserError
    return UserError(f"{archive}: refusing to extract member {member!r}: {why} (it was not written); the archive is "
                     f"damaged or not the official one: delete it and download it again")


def _inside(path, root):
    "Whether `path`, with every symlink on disk resolved, is `root` or below it."
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _is_absolute(name):
    "An absolute name on any system: a leading slash or backslash, or a drive letter."
    return name.startswith(('/', '\\')) or os.path.isabs(name) or (len(name) > 1 and name[1] == ':')


def check_tar_member(archive, m, to):
    """Refuse a tar member that would land (or link) outside `to`, or that is not a file, folder or link.

    Symlinks already extracted are resolved on disk, so call it for each member just before extracting it."""
    if _is_absolute(m.name): raise _unsafe(archive, m.name, 'its path is absolute')
    dest = os.path.join(to, m.name)
    if not _inside(dest, to): raise _unsafe(archive, m.name, f'it would land outside {to}')
    if m.issym():
        if _is_absolute(m.linkname): raise _unsafe(archive, m.name, f'it is a symbolic link to the absolute path {m.linkname!r}')
        if not _inside(os.path.join(os.path.dirname(dest), m.linkname), to):
            raise _unsafe(archive, m.name, f'it is a symbolic link to {m.linkname!r}, outside {to}')
    elif m.islnk():
        if _is_absolute(m.linkname) or not _inside(os.path.join(to, m.linkname), to):
            raise _unsafe(archive, m.name, f'it is a hard link to {m.linkname!r}, outside {to}')
    elif not (m.isfile() or m.isdir()):
        raise _unsafe(archive, m.name, 'it is a device, FIFO or other special file')


def _extract_tar(archive, to):
    with tarfile.open(archive) as tar:  # any compression
        if HAS_DATA_FILTER:  # our checks, then Python's own 'data' filter (also drops set-uid bits, odd modes)
            def data(m, path):
                check_tar_member(archive, m, path)
                try: return tarfile.data_filter(m, path)
                except tarfile.FilterError as e: raise _unsafe(archive, m.name, str(e)) from None
            tar.extractall(to, filter=data)
            return
        for m in tar:  # older Pythons: check each member as it comes, with earlier members on disk
            check_tar_member(archive, m, to)
            if m.isfile(): m.mode = (m.mode & 0o755) | 0o600  # no set-uid/set-gid/sticky bits, always writable by us
            tar.extract(m, to, set_attrs=not m.isdir())  # a read-only folder would block its own content


def _extract_zip(archive, to):
    with zipfile.ZipFile(archive) as z:
        infos = z.infolist()
        for info in infos:  # zipfile itself rewrites bad names; we refuse them instead of extracting elsewhere
            name = info.filename
            if _is_absolute(name): raise _unsafe(archive, name, 'its path is absolute')
            if '..' in name.replace('\\', '/').split('/'): raise _unsafe(archive, name, "its path contains '..'")
            if not _inside(os.path.join(to, name), to): raise _unsafe(archive, name, f'it would land outside {to}')
        z.extractall(to, infos)


def extract(archive, to, remove=False):
    """Extract a tar (any compression) or zip archive into `to`; no member may land or link outside `to`.

    A member with an absolute path, a `..` path leaving `to`, a link pointing outside `to` or a device file stops
    the extraction with an error naming the archive and the member; `remove` deletes the archive afterwards."""
    from so_tutorial.io import UserError
    archive, to = Path(archive), Path(to)
    print(f'  extracting {archive} -> {to}')
    if not archive.is_file(): raise UserError(f'archive {archive} does not exist')
    to.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive): _extract_zip(archive, to)
    elif tarfile.is_tarfile(archive): _extract_tar(archive, to)
    else: raise UserError(f'{archive} is neither a tar nor a zip archive (a truncated download?); delete it and download it again')
    if remove: archive.unlink()
    return to


def standard_prepare(key, args, folder, archives, arrange, gdrive, files):
    "Download and extract the archives into a staging folder, arrange them, then fetch the split and extra files."
    root = Path(args.root).expanduser()
    if has_images(key, folder): print(f'{key}: images already in {folder}; not downloading them')
    else:
        staging = root / '_staging' / key
        if staging.exists(): shutil.rmtree(staging)
        staging.mkdir(parents=True)
        for local in args.archive or []: extract(Path(local).expanduser(), staging, args.remove_archives)
        for url, md5, filename in ([] if args.archive else archives):
            extract(fetch(url, downloads_dir(args), md5, filename), staging, args.remove_archives)  # md5-checked
        arrange(staging, folder)
        shutil.rmtree(staging)
        if not any((root / '_staging').iterdir()): (root / '_staging').rmdir()
    for url, md5 in files: fetch(url, folder, md5, verify_md5=False)  # extras the loader does not read
    for filename, file_id in gdrive.items(): fetch_gdrive(file_id, folder, filename)


# ------------------------------------------------------------------------------------------- verifying

def count_problems(splits):
    "Differences between a loaded dataset's class/split counts and those of CoOp's split files."
    spec, out = spec_of(splits.key), []
    fix = f'a wrong or truncated split file? delete it and rerun `{spec.command(splits.root)}`'
    if len(splits.classnames) != spec.n_classes:
        out.append(f'{len(splits.classnames)} classes, expected {spec.n_classes} ({fix})')
    for name, got, want in (('train', splits.train, spec.n_train), ('val', splits.val, spec.n_val), ('test', splits.test, spec.n_test)):
        if len(got) != want: out.append(f'{name}: {len(got)} images, expected {want} ({fix})')
    return out


def _exists(path): return None if path.is_file() else 'missing'


def _readable(path):
    from PIL import Image
    if not path.is_file(): return 'missing'
    try:
        with Image.open(path) as im: im.load()
    except Exception as e: return f'unreadable ({type(e).__name__}: {e})'
    return None


def verify(key, root, quick=False, counts=True, workers=8, chunk=20_000):
    "Load the dataset and check every image; return (summary line or None, list of problems)."
    from so_tutorial.data import load_splits
    from so_tutorial.io import UserError
    try: s = load_splits(key, Path(root).expanduser())
    except UserError as e: return None, [str(e)]
    problems = count_problems(s) if counts else []
    paths = list(dict.fromkeys(it.path for split in (s.train, s.val, s.test) for it in split))
    check = _exists if quick else _readable
    with ThreadPoolExecutor(max(1, workers)) as ex:
        for i in range(0, len(paths), chunk):
            part = paths[i:i + chunk]
            for p, err in zip(part, ex.map(check, [s.root / p for p in part])):
                if err: problems.append(f'{err}: {s.root / p}')
    how = 'exist' if quick else 'open'
    return (f'{len(s.classnames)} classes, train/val/test {len(s.train)}/{len(s.val)}/{len(s.test)} images, '
            f'all {len(paths)} files {how} ({s.folder})'), problems


def report(key, summary, problems):
    "Print the verdict for one dataset; return 0 when it is fine, else 1."
    if not problems:
        print(f'{key}: OK: {summary}')
        return 0
    print(f'{key}: {len(problems)} problem(s):')
    for p in problems: print(f'  {p}')
    return 1
