"Archive extraction in data_prep: crafted tar and zip archives must never write outside the target folder."
import hashlib, importlib.util, io, os, sys, tarfile, zipfile
from pathlib import Path

import numpy as np
import pytest

from so_tutorial.data import load_splits, write_fixture_tree
from so_tutorial.io import UserError

REPO = Path(__file__).resolve().parent.parent
DATA_PREP = REPO / 'data_prep'
if str(DATA_PREP) not in sys.path: sys.path.insert(0, str(DATA_PREP))
import common  # noqa: E402  (data_prep/common.py)


def load_script(name):
    spec = importlib.util.spec_from_file_location(f'data_prep_{name}', DATA_PREP / f'{name}.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(params=['data_filter', 'fallback'] if common.HAS_DATA_FILTER else ['fallback'])
def how(request, monkeypatch):
    "Run each tar test with Python's 'data' filter (where it exists) and with the member-by-member check of older Pythons."
    monkeypatch.setattr(common, 'HAS_DATA_FILTER', request.param == 'data_filter')
    return request.param


def make_tar(path, members, mode='w:gz'):
    "A tar holding `members`: (name, kind, payload) with kind 'file' (payload: bytes), 'dir', 'sym' or 'hard' (payload: link target)."
    with tarfile.open(path, mode) as tar:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            if kind == 'file':
                info.size = len(payload); tar.addfile(info, io.BytesIO(payload)); continue
            info.type = {'dir': tarfile.DIRTYPE, 'sym': tarfile.SYMTYPE, 'hard': tarfile.LNKTYPE, 'fifo': tarfile.FIFOTYPE}[kind]
            if kind == 'dir': info.mode = 0o755
            if kind in ('sym', 'hard'): info.linkname = payload
            tar.addfile(info)
    return path


def make_zip(path, members):
    with zipfile.ZipFile(path, 'w') as z:
        for name, data in members: z.writestr(zipfile.ZipInfo(name), data)
    return path


def snapshot(top):
    "Every path below `top` (files, folders, links), to prove that nothing new appeared outside the target."
    return sorted(str(p.relative_to(top)) for p in Path(top).rglob('*'))


@pytest.fixture
def box(tmp_path):
    "A sandbox: `box/staging` is the extraction target; anything new elsewhere in `box` is an escape."
    (tmp_path / 'box' / 'staging').mkdir(parents=True)
    (tmp_path / 'box' / 'secret.txt').write_text('do not touch')
    return tmp_path / 'box'


ESCAPES = {  # case: (members, the member the error must name)
    'dotdot': ([('ok.txt', 'file', b'fine'), ('../escaped.txt', 'file', b'pwned')], '../escaped.txt'),
    'nested_dotdot': ([('a/b/../../../escaped.txt', 'file', b'pwned')], 'a/b/../../../escaped.txt'),
    'absolute': ([('{ABS}', 'file', b'pwned')], '{ABS}'),  # {ABS}: an absolute path next to the sandbox
    'symlink_out': ([('link', 'sym', '..'), ('link/escaped.txt', 'file', b'pwned')], 'link'),
    'symlink_absolute': ([('etc', 'sym', '/etc')], 'etc'),
    'symlink_chain': ([('a', 'dir', None), ('a/up', 'sym', '../..'), ('a/up/escaped.txt', 'file', b'pwned')], 'a/up'),
    'symlink_overwrite': ([('secret_link', 'sym', '../secret.txt'), ('secret_link', 'file', b'overwritten')], 'secret_link'),
    'hardlink_out': ([('hard', 'hard', '../secret.txt')], 'hard'),
    'hardlink_absolute': ([('hard', 'hard', '/etc/passwd')], 'hard'),
    'fifo': ([('pipe', 'fifo', None)], 'pipe'),
}


@pytest.mark.parametrize('case', list(ESCAPES))
def test_tar_escapes_are_refused(box, case, how):
    members, culprit = ESCAPES[case]
    absolute = str(box.parent / 'escaped_abs.txt')
    members = [(name.replace('{ABS}', absolute), kind, payload) for name, kind, payload in members]
    culprit = culprit.replace('{ABS}', absolute)
    archive = make_tar(box.parent / f'{case}.tar.gz', members)
    before = snapshot(box.parent)
    with pytest.raises(UserError) as e: common.extract(archive, box / 'staging')
    msg = str(e.value)
    assert msg.startswith(f'{archive}: refusing to extract member {culprit!r}: ') and '\n' not in msg
    outside = [p for p in snapshot(box.parent) if not p.startswith('box/staging') and p not in before]
    assert outside == [], outside
    assert (box / 'secret.txt').read_text() == 'do not touch' and not Path(absolute).exists()


def test_tar_escape_through_the_command_line_exits_1(box, capsys, monkeypatch):
    "End to end: a dataset script given a malicious --archive stops with exit code 1 and one error line, no traceback."
    archive = make_tar(box.parent / 'dtd-r1.0.1.tar.gz', [('dtd/images/banded/a.jpg', 'file', b'x'), ('../../escaped.txt', 'file', b'pwned')])
    root = box / 'data'
    rc = load_script('dtd').main(['--root', str(root), '--no-counts', '--archive', str(archive)])
    err = capsys.readouterr().err
    assert rc == 1 and 'dtd: error:' in err and "'../../escaped.txt'" in err and 'Traceback' not in err
    assert not (box.parent / 'escaped.txt').exists() and not (box / 'escaped.txt').exists()


@pytest.mark.parametrize('mode,suffix', [('w', '.tar'), ('w:gz', '.tar.gz'), ('w:bz2', '.tar.bz2'), ('w:xz', '.tar.xz')])
def test_tar_inside_links_and_compressions_work(box, how, mode, suffix):
    "Links that stay inside the target are fine; every compression is detected from the content."
    archive = make_tar(box.parent / f'good{suffix}', [
        ('d', 'dir', None), ('d/a.txt', 'file', b'hello'), ('d/same', 'sym', 'a.txt'), ('top', 'sym', 'd'),
        ('d/hard', 'hard', 'd/a.txt'), ('d/e/b.txt', 'file', b'inside')], mode)
    out = common.extract(archive, box / 'staging')
    assert (out / 'd' / 'same').read_text() == 'hello' and (out / 'top' / 'a.txt').read_text() == 'hello'
    assert (out / 'd' / 'hard').read_text() == 'hello' and (out / 'd' / 'e' / 'b.txt').read_text() == 'inside'
    assert snapshot(box) == sorted(['secret.txt', 'staging', *[f'staging/{p}' for p in snapshot(out)]])


def test_tar_set_uid_bits_are_dropped(box, how):
    archive = box.parent / 'suid.tar'
    with tarfile.open(archive, 'w') as tar:
        info = tarfile.TarInfo('tool'); info.size = 2; info.mode = 0o4777
        tar.addfile(info, io.BytesIO(b'#!'))
    common.extract(archive, box / 'staging')
    mode = os.stat(box / 'staging' / 'tool').st_mode
    assert not mode & 0o4000 and not mode & 0o002


ZIP_ESCAPES = {
    'zip_slip': [('ok.txt', b'fine'), ('../escaped.txt', b'pwned')],
    'zip_slip_deep': [('a/../../escaped.txt', b'pwned')],
    'zip_absolute': [('{ABS}', b'pwned')],
    'zip_backslash': [('..\\escaped.txt', b'pwned')],
    'zip_drive': [('C:/escaped.txt', b'pwned')],
}


@pytest.mark.parametrize('case', list(ZIP_ESCAPES))
def test_zip_escapes_are_refused(box, case):
    absolute = str(box.parent / 'escaped_abs.txt')
    members = [(name.replace('{ABS}', absolute), data) for name, data in ZIP_ESCAPES[case]]
    archive = make_zip(box.parent / f'{case}.zip', members)
    before = snapshot(box.parent)
    with pytest.raises(UserError) as e: common.extract(archive, box / 'staging')
    assert str(archive) in str(e.value) and repr(members[-1][0]) in str(e.value)
    assert snapshot(box.parent) == before  # refused before anything was written, even inside
    assert not Path(absolute).exists()


def test_zip_through_a_symlinked_folder_inside_the_target_is_refused(box):
    "A target that already holds a link to the outside (an earlier archive's) is no way out either."
    (box / 'staging' / 'out').symlink_to(box, target_is_directory=True)
    archive = make_zip(box.parent / 'via_link.zip', [('out/escaped.txt', b'pwned')])
    with pytest.raises(UserError, match='would land outside'): common.extract(archive, box / 'staging')
    assert not (box / 'escaped.txt').exists()


def test_not_an_archive(box):
    junk = box.parent / 'junk.tar.gz'
    junk.write_bytes(b'<html>quota exceeded</html>')
    with pytest.raises(UserError, match='neither a tar nor a zip'): common.extract(junk, box / 'staging')
    with pytest.raises(UserError, match='does not exist'): common.extract(box.parent / 'nope.zip', box / 'staging')


def test_remove_after_extracting(box):
    archive = make_zip(box.parent / 'fine.zip', [('a/b.txt', b'x')])
    common.extract(archive, box / 'staging', remove=True)
    assert (box / 'staging' / 'a' / 'b.txt').read_bytes() == b'x' and not archive.exists()


def test_no_data_prep_script_extracts_with_an_unchecked_helper():
    "Every extraction goes through common.extract: no extractall, unpack_archive or torchvision extract helper elsewhere."
    banned = ('extractall(', 'unpack_archive', 'extract_archive', 'download_and_extract_archive', 'parse_train_archive',
              'parse_val_archive', 'parse_devkit_archive')
    for p in sorted(DATA_PREP.glob('*.py')):
        text = p.read_text()
        if p.name == 'common.py': text = text.replace('tar.extractall(to, filter=data)', '').replace('z.extractall(to, infos)', '')
        assert not [b for b in banned if b in text], p.name


# ------------------------------------------------------------------------------------------- ImageNet archives

def fake_imagenet_archives(folder, tree):
    "ILSVRC-2012-shaped archives (train tar of per-class tars, flat val tar, devkit) built from a fixture ImageNet."
    from scipy.io import savemat
    folder.mkdir(parents=True, exist_ok=True)
    train, val = tree / 'images' / 'train', tree / 'images' / 'val'
    wnids = sorted(p.name for p in train.iterdir())
    inner = []
    for w in wnids:
        t = folder / f'{w}.tar'
        with tarfile.open(t, 'w') as tar:
            for img in sorted((train / w).iterdir()): tar.add(img, arcname=img.name)
        inner.append(t)
    with tarfile.open(folder / 'ILSVRC2012_img_train.tar', 'w') as tar:
        for t in inner: tar.add(t, arcname=t.name); t.unlink()
    flat = sorted((img.name, w) for w in wnids for img in (val / w).iterdir())
    with tarfile.open(folder / 'ILSVRC2012_img_val.tar', 'w') as tar:
        for name, w in flat: tar.add(val / w / name, arcname=name)
    ids = {w: i + 1 for i, w in enumerate(wnids)}  # ILSVRC2012_ID 1..n for the leaves, plus one parent synset
    rec = np.array([(ids[w], w, 0) for w in wnids] + [(len(wnids) + 1, 'n00000001', 3)],
                   dtype=[('ILSVRC2012_ID', 'O'), ('WNID', 'O'), ('num_children', 'O')])
    dk = folder / '_devkit' / 'ILSVRC2012_devkit_t12' / 'data'
    dk.mkdir(parents=True)
    savemat(dk / 'meta.mat', {'synsets': rec})
    (dk / 'ILSVRC2012_validation_ground_truth.txt').write_text(''.join(f'{ids[w]}\n' for _, w in flat))
    with tarfile.open(folder / 'ILSVRC2012_devkit_t12.tar.gz', 'w:gz') as tar:
        tar.add(folder / '_devkit' / 'ILSVRC2012_devkit_t12', arcname='ILSVRC2012_devkit_t12')
    return [w for _, w in flat]


def md5(p): return hashlib.md5(Path(p).read_bytes()).hexdigest()


def test_imagenet_from_archives(tmp_path, monkeypatch, capsys):
    "The ImageNet script extracts the official archives' shapes with the safe extraction and sorts val by the devkit."
    tree = tmp_path / 'tree'
    write_fixture_tree(tree, ['imagenet'])
    arch = tmp_path / 'ilsvrc'
    val_wnids = fake_imagenet_archives(arch, tree / 'imagenet')
    imagenet = load_script('imagenet')
    assert imagenet.devkit_val_wnids(arch / 'ILSVRC2012_devkit_t12.tar.gz') == val_wnids
    # the real md5s first: the fakes are refused as damaged
    root = tmp_path / 'data'
    assert imagenet.main(['--root', str(root), '--no-counts', '--archives', str(arch)]) == 1
    assert 'md5 differs' in capsys.readouterr().err
    monkeypatch.setattr(imagenet, 'ARCHIVES', {k: (n, md5(arch / n)) for k, (n, _) in imagenet.ARCHIVES.items()})
    (root / 'imagenet').mkdir(parents=True, exist_ok=True)
    (root / 'imagenet' / 'classnames.txt').write_text((tree / 'imagenet' / 'classnames.txt').read_text())  # made-up wnids
    assert imagenet.main(['--root', str(root), '--no-counts', '--archives', str(arch)]) == 0, capsys.readouterr()
    got, want = load_splits('imagenet', root), load_splits('imagenet', tree)
    assert (got.classnames, got.train, got.test) == (want.classnames, want.train, want.test)
    assert not list((root / 'imagenet' / 'images' / 'train').glob('*.tar'))  # inner tars removed


def test_imagenet_md5s_are_torchvisions():
    tvi = pytest.importorskip('torchvision.datasets.imagenet')
    assert load_script('imagenet').ARCHIVES == tvi.ARCHIVE_META


def test_imagenet_inner_class_tar_cannot_escape(tmp_path):
    "A per-class tar inside the train tar is extracted with the same checks."
    imagenet = load_script('imagenet')
    inner = make_tar(tmp_path / 'n01440764.tar', [('../../escaped.JPEG', 'file', b'x')], 'w')
    outer = tmp_path / 'train.tar'
    with tarfile.open(outer, 'w') as tar: tar.add(inner, arcname=inner.name)
    with pytest.raises(UserError, match=r"n01440764.tar: refusing to extract member '\.\./\.\./escaped\.JPEG'"):
        imagenet.extract_train(outer, tmp_path / 'out' / 'train')
    assert not (tmp_path / 'escaped.JPEG').exists() and not (tmp_path / 'out' / 'escaped.JPEG').exists()
