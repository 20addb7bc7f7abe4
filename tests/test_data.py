"Tests of so_tutorial.data (layout, loaders, few-shot sampling, datasets) and of the data_prep scripts, on fixture trees."
import importlib.util, json, logging, pickle, random, shutil, subprocess, sys, tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from so_tutorial.data import (DATASETS, Item, Splits, ImageListDataset, few_shot, imagenet_classnames, load_splits,
                              prompts, read_item_list, seed_everything, write_fixture_tree, write_item_list)
from so_tutorial.io import UserError

REPO = Path(__file__).resolve().parent.parent
DATA_PREP = REPO / 'data_prep'
KEYS = list(DATASETS)
JSON_KEYS = [k for k in KEYS if DATASETS[k].kind == 'json']


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
    "The default fixture tree of all 11 datasets (3 classes, 4/2/2 images per class), shared read-only."
    root = tmp_path_factory.mktemp('data')
    write_fixture_tree(root)
    return root


def copy_tree(src, dst, keys):
    for k in keys:
        f = next(src / n for n in DATASETS[k].folders if (src / n).is_dir())
        shutil.copytree(f, dst / f.name)
    return dst


# ------------------------------------------------------------------------------------------- the table

def test_datasets_table():
    assert KEYS == ['imagenet', 'sun397', 'fgvc', 'eurosat', 'stanford_cars', 'food101', 'oxford_pets',
                    'oxford_flowers', 'caltech101', 'dtd', 'ucf101']
    assert sum(s.n_classes for s in DATASETS.values()) == 1000 + 397 + 100 + 10 + 196 + 101 + 37 + 102 + 100 + 47 + 101
    assert DATASETS['dtd'].name == 'DTD' and DATASETS['dtd'].folders == ('dtd', 'DTD')
    assert DATASETS['caltech101'].folders[0] == 'caltech-101' and 'Caltech101' in DATASETS['caltech101'].folders
    assert DATASETS['eurosat'].split_file == 'split_zhou_EuroSAT.json'
    assert (DATASETS['oxford_pets'].n_train, DATASETS['oxford_pets'].n_val, DATASETS['oxford_pets'].n_test) == (2944, 736, 3669)
    assert DATASETS['dtd'].command('/d') == 'python data_prep/dtd.py --root /d'
    for k in KEYS: assert (DATA_PREP / f'{k}.py').is_file(), k


# ------------------------------------------------------------------------------------------- loaders

@pytest.mark.parametrize('key', KEYS)
def test_every_loader_on_its_fixture(tree, key):
    s = load_splits(key, tree)
    assert isinstance(s, Splits) and s.key == key and s.root == tree
    assert len(s.classnames) == 3
    expected = (18, 0, 6) if key == 'imagenet' else (12, 6, 6)  # imagenet: train folder holds train+val, val/ is test
    assert (len(s.train), len(s.val), len(s.test)) == expected
    for it in s.train + s.val + s.test:
        assert isinstance(it, Item)
        assert (tree / it.path).is_file(), it.path
        assert '\\' not in it.path and not it.path.startswith('/')
        assert it.path.split('/')[0] == DATASETS[key].folders[0]
        assert it.classname == s.classnames[it.label]
    for split in (s.train, s.test): assert sorted({it.label for it in split}) == [0, 1, 2]
    assert len({it.path for it in s.train + s.val + s.test}) == sum(expected)  # no image in two splits


def test_fixture_sizes_and_names(tmp_path):
    write_fixture_tree(tmp_path, ['dtd', 'fgvc', 'imagenet'], n_classes=5, per_class=(3, 1, 2))
    d = load_splits('dtd', tmp_path)
    assert d.classnames[:3] == ['banded', 'blotchy', 'braided'] and len(d.classnames) == 5
    assert (len(d.train), len(d.val), len(d.test)) == (15, 5, 10)
    f = load_splits('fgvc', tmp_path)
    assert f.classnames == [l for l in (tmp_path / 'fgvc_aircraft' / 'variants.txt').read_text().splitlines()]
    assert (len(f.train), len(f.val), len(f.test)) == (15, 5, 10)
    i = load_splits('imagenet', tmp_path)
    assert (len(i.train), len(i.val), len(i.test)) == (20, 0, 10)


def test_fixture_split_json_is_coop_format(tree):
    d = json.loads((tree / 'dtd' / 'split_zhou_DescribableTextures.json').read_text())
    assert sorted(d) == ['test', 'train', 'val']
    path, label, name = d['train'][0]
    assert isinstance(path, str) and isinstance(label, int) and isinstance(name, str)
    assert (tree / 'dtd' / 'images' / path).is_file()
    assert d['train'][0][1] == 2  # classes listed last label first: first appearance differs from label order


def test_fixture_images_are_learnable(tree):
    "Class colours differ: a nearest-class-mean classifier on mean colours gets every test image right."
    s = load_splits('eurosat', tree)
    def mean_rgb(items): return torch.stack([torch.tensor(np.asarray(img, dtype=np.float32)).mean((0, 1))
                                             for img, _ in ImageListDataset(items, tree)])
    means = torch.stack([mean_rgb([it for it in s.train if it.label == c]).mean(0) for c in range(3)])
    pred = torch.cdist(mean_rgb(s.test), means).argmin(1)
    assert pred.tolist() == [it.label for it in s.test]


@pytest.mark.parametrize('key', KEYS)
def test_clip_lora_alias_folders(tmp_path, key):
    write_fixture_tree(tmp_path, [key], layout='clip-lora')
    s = load_splits(key, tmp_path)
    assert s.folder.name == DATASETS[key].folders[-1]
    assert all((tmp_path / it.path).is_file() for it in s.train + s.val + s.test)
    assert len(s.classnames) == 3


def test_imagenet_clip_lora_layout_has_no_images_folder(tmp_path):
    write_fixture_tree(tmp_path, ['imagenet'], layout='clip-lora')
    assert (tmp_path / 'imagenet' / 'train').is_dir() and not (tmp_path / 'imagenet' / 'images').exists()
    assert load_splits('imagenet', tmp_path).train[0].path.startswith('imagenet/train/')


def test_coop_name_wins_over_alias(tmp_path):
    write_fixture_tree(tmp_path, ['dtd'])
    write_fixture_tree(tmp_path / 'other', ['dtd'], n_classes=2)
    shutil.move(tmp_path / 'other' / 'dtd', tmp_path / 'DTD')
    s = load_splits('dtd', tmp_path)
    assert s.folder.name == 'dtd' and len(s.classnames) == 3


# ------------------------------------------------------------------------------------------- bad input

def test_unknown_key_lists_known_keys(tree):
    with pytest.raises(UserError) as e: load_splits('cifar10', tree)
    assert 'cifar10' in str(e.value) and all(k in str(e.value) for k in KEYS)


def test_missing_root(tmp_path):
    with pytest.raises(UserError) as e: load_splits('dtd', tmp_path / 'nope')
    assert str(tmp_path / 'nope') in str(e.value) and 'python data_prep/dtd.py --root' in str(e.value)


def test_missing_dataset_folder_lists_what_was_tried(tmp_path):
    with pytest.raises(UserError) as e: load_splits('caltech101', tmp_path)
    msg = str(e.value)
    assert str(tmp_path / 'caltech-101') in msg and str(tmp_path / 'Caltech101') in msg
    assert 'python data_prep/caltech101.py --root' in msg


def test_missing_image_folder(tmp_path):
    write_fixture_tree(tmp_path, ['dtd', 'imagenet', 'stanford_cars'])
    shutil.rmtree(tmp_path / 'dtd' / 'images')
    with pytest.raises(UserError, match='image folder') as e: load_splits('dtd', tmp_path)
    assert str(tmp_path / 'dtd' / 'images') in str(e.value) and 'data_prep/dtd.py' in str(e.value)
    shutil.rmtree(tmp_path / 'imagenet' / 'images' / 'train')
    with pytest.raises(UserError, match='image folder'): load_splits('imagenet', tmp_path)
    shutil.rmtree(tmp_path / 'stanford_cars' / 'cars_train')
    with pytest.raises(UserError, match='cars_train'): load_splits('stanford_cars', tmp_path)


@pytest.mark.parametrize('key', ['dtd', 'fgvc', 'ucf101'])
def test_missing_split_file_names_path_and_command(tmp_path, key):
    folders = write_fixture_tree(tmp_path, [key])
    (folders[key] / DATASETS[key].split_file).unlink()
    with pytest.raises(UserError) as e: load_splits(key, tmp_path)
    assert str(folders[key] / DATASETS[key].split_file) in str(e.value)
    assert f'python data_prep/{key}.py --root {tmp_path}' in str(e.value)


def test_fgvc_missing_variant_file_and_unknown_variant(tmp_path):
    f = write_fixture_tree(tmp_path, ['fgvc'])['fgvc']
    test_txt = f / 'images_variant_test.txt'
    lines = test_txt.read_text().splitlines()
    test_txt.write_text('\n'.join(lines[:2] + ['1234567 Concorde'] + lines[2:]) + '\n')
    with pytest.raises(UserError, match=r"images_variant_test.txt:3: variant 'Concorde'"): load_splits('fgvc', tmp_path)
    test_txt.unlink()
    with pytest.raises(UserError, match='images_variant_test.txt is missing'): load_splits('fgvc', tmp_path)


@pytest.mark.parametrize('content,match', [
    ('{"train": [', 'not a CoOp split file'),
    ('{"train": [], "val": []}', 'not a CoOp split file'),
    ('{"train": [["a.jpg", 0]], "val": [], "test": []}', 'not a CoOp split file'),
    ('{"train": [["a.jpg", 0, "x"], ["b.jpg", 2, "z"]], "val": [], "test": []}', r'labels are not 0\.\.1'),
    ('{"train": [["a.jpg", 0, "x"], ["b.jpg", 0, "y"]], "val": [], "test": []}', "named both 'x' and 'y'"),
])
def test_malformed_split_file(tmp_path, content, match):
    f = write_fixture_tree(tmp_path, ['dtd'])['dtd'] / 'split_zhou_DescribableTextures.json'
    f.write_text(content)
    with pytest.raises(UserError, match=match) as e: load_splits('dtd', tmp_path)
    assert 'python data_prep/dtd.py' in str(e.value)


def test_imagenet_bad_trees(tmp_path):
    f = write_fixture_tree(tmp_path, ['imagenet'])['imagenet']
    lines = (f / 'classnames.txt').read_text().splitlines()
    (f / 'classnames.txt').write_text('\n'.join(lines[:2]) + '\n')  # the fixture's third wnid is made up
    with pytest.raises(UserError, match='not ILSVRC-2012 classes') as e: load_splits('imagenet', tmp_path)
    assert 'n01442764' in str(e.value) and str(f / 'classnames.txt') in str(e.value) and 'data_prep/imagenet.py' in str(e.value)
    (f / 'classnames.txt').write_text('\n'.join(lines) + '\n')
    (f / 'images' / 'val' / 'n09999999').mkdir()
    with pytest.raises(UserError, match='that train/ lacks'): load_splits('imagenet', tmp_path)
    (f / 'images' / 'val' / 'n09999999').rmdir()
    shutil.rmtree(f / 'images' / 'val')
    with pytest.raises(UserError, match='val is missing'): load_splits('imagenet', tmp_path)


# ------------------------------------------------------------------------------------------- ImageNet class names

def test_imagenet_classnames_are_the_papers_list():
    "The shipped list: 1,000 sorted ILSVRC-2012 wnids, each with the name of OpenAI CLIP's list (open_clip's copy)."
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    names = imagenet_classnames()
    assert len(names) == 1000 and list(names) == sorted(names) and all(w[0] == 'n' and len(w) == 9 for w in names)
    assert list(names.values()) == list(IMAGENET_CLASSNAMES)
    assert names['n01440764'] == 'tench' and names['n15075141'] == 'toilet paper'
    assert names['n02012849'] == 'crane bird' and names['n03126707'] == 'construction crane'


def test_imagenet_wnids_match_timm_when_installed():
    timm_info = pytest.importorskip('timm').__file__
    synsets = Path(timm_info).parent / 'data' / '_info' / 'imagenet_synsets.txt'
    if not synsets.is_file(): pytest.skip('this timm has no ImageNet synset list')
    assert list(imagenet_classnames()) == synsets.read_text().split()


def test_imagenet_names_come_from_the_papers_list(tmp_path, caplog):
    "Real wnids take the paper's names without classnames.txt; a classnames.txt that disagrees is reported, not used."
    f = write_fixture_tree(tmp_path, ['imagenet'])['imagenet']
    assert load_splits('imagenet', tmp_path).classnames == ['tench', 'goldfish', 'great white shark']  # fixture's file
    for w in ('n01441764', 'n01442764'):  # make the tree all-real: rename the made-up class folders
        real = {'n01441764': 'n01443537', 'n01442764': 'n01484850'}[w]
        for sub in ('train', 'val'): (f / 'images' / sub / w).rename(f / 'images' / sub / real)
    (f / 'classnames.txt').unlink()
    s = load_splits('imagenet', tmp_path)
    assert s.classnames == ['tench', 'goldfish', 'great white shark'] and s.train[0].classname == 'tench'
    (f / 'classnames.txt').write_text('n01440764 Tinca tinca\nn01443537 goldfish\n')
    with caplog.at_level(logging.WARNING, logger='so_tutorial.data'):
        s = load_splits('imagenet', tmp_path)
    assert s.classnames[0] == 'tench' and {it.classname for it in s.test if it.label == 0} == {'tench'}
    assert "names 1 class(es) differently" in caplog.text and "'Tinca tinca' (paper: 'tench')" in caplog.text
    assert str(f / 'classnames.txt') in caplog.text


def test_imagenet_classnames_file_is_installed(tmp_path):
    "A wheel built from the repository carries the names file, and the installed package reads it from there."
    if importlib.util.find_spec('setuptools') is None or importlib.util.find_spec('wheel') is None:
        pytest.skip('needs setuptools and wheel to build')
    src = tmp_path / 'src'
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns('.git', 'nbs', 'tests', '_docs', 'results', 'benchmarks',
                                                             '*.egg-info', 'build', '__pycache__', '.ipynb_checkpoints'))
    r = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w',
                        str(tmp_path / 'dist'), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    wheel = next((tmp_path / 'dist').glob('so_tutorial-*.whl'))
    import zipfile
    assert 'so_tutorial/imagenet_classnames.txt' in zipfile.ZipFile(wheel).namelist()
    target = tmp_path / 'site'
    zipfile.ZipFile(wheel).extractall(target)  # what pip install puts in site-packages
    code = ('import so_tutorial.data as d, sys; n = d.imagenet_classnames(); '
            'assert d.__file__.startswith(sys.argv[1]), d.__file__; print(len(n), n["n01440764"])')
    env = {k: v for k, v in __import__('os').environ.items() if k != 'PYTHONPATH'}
    r = subprocess.run([sys.executable, '-c', code, str(target)], capture_output=True, text=True, cwd=tmp_path,
                       env={**env, 'PYTHONPATH': str(target)}, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ['1000', 'tench']


# ------------------------------------------------------------------------------------------- data that cannot train

def _rewrite_split(f, **changes):
    d = json.loads(f.read_text()); d.update(changes); f.write_text(json.dumps(d))
    return d


def test_empty_train_split_is_refused(tmp_path):
    f = write_fixture_tree(tmp_path, ['dtd'])['dtd'] / 'split_zhou_DescribableTextures.json'
    _rewrite_split(f, train=[])
    with pytest.raises(UserError) as e: load_splits('dtd', tmp_path)
    msg = str(e.value)
    assert msg.startswith(f'{f}: the train split is empty') and 'python data_prep/dtd.py --root' in msg and '\n' not in msg


def test_empty_test_split_is_refused(tmp_path):
    f = write_fixture_tree(tmp_path, ['eurosat'])['eurosat'] / 'split_zhou_EuroSAT.json'
    _rewrite_split(f, test=[])
    with pytest.raises(UserError, match='the test split is empty') as e: load_splits('eurosat', tmp_path)
    assert str(f) in str(e.value)


def test_empty_val_split_is_allowed(tmp_path):
    f = write_fixture_tree(tmp_path, ['dtd'])['dtd'] / 'split_zhou_DescribableTextures.json'
    _rewrite_split(f, val=[])
    s = load_splits('dtd', tmp_path)
    seed_everything(1)
    train, val = few_shot(s, 2)
    assert len(train) == 6 and val == []


def test_class_without_training_item_is_refused(tmp_path):
    "A class seen only in val/test used to be dropped silently from training (and still scored at test time)."
    f = write_fixture_tree(tmp_path, ['dtd'])['dtd'] / 'split_zhou_DescribableTextures.json'
    d = json.loads(f.read_text())
    _rewrite_split(f, train=[r for r in d['train'] if r[1] != 1])
    with pytest.raises(UserError) as e: load_splits('dtd', tmp_path)
    assert str(f) in str(e.value) and "1 of 3 classes have no training image (1 'blotchy')" in str(e.value)


def test_fgvc_empty_and_missing_classes(tmp_path):
    f = write_fixture_tree(tmp_path, ['fgvc'])['fgvc']
    train = f / 'images_variant_train.txt'
    lines = train.read_text().splitlines()
    train.write_text('\n'.join(l for l in lines if not l.endswith(' 727-200')) + '\n')
    with pytest.raises(UserError, match=r"no training image \(1 '727-200'\)") as e: load_splits('fgvc', tmp_path)
    assert str(train) in str(e.value)
    train.write_text('')
    with pytest.raises(UserError, match='the train split is empty'): load_splits('fgvc', tmp_path)
    train.write_text('\n'.join(lines) + '\n')
    (f / 'images_variant_test.txt').write_text('\n')
    with pytest.raises(UserError, match='images_variant_test.txt: the test split is empty'): load_splits('fgvc', tmp_path)


def test_imagenet_empty_class_folder_and_empty_val(tmp_path):
    f = write_fixture_tree(tmp_path, ['imagenet'])['imagenet']
    gold = f / 'images' / 'train' / 'n01441764'
    for img in gold.iterdir(): img.unlink()
    with pytest.raises(UserError, match=r"1 of 3 classes have no training image \(n01441764") as e:
        load_splits('imagenet', tmp_path)
    assert str(f / 'images' / 'train') in str(e.value)
    gold.rmdir()
    shutil.rmtree(f / 'images' / 'val' / 'n01441764')
    for d in (f / 'images' / 'val').iterdir():
        for img in d.iterdir(): img.unlink()
    with pytest.raises(UserError, match='the test split is empty') as e: load_splits('imagenet', tmp_path)
    assert str(f / 'images' / 'val') in str(e.value)


def test_verify_reports_an_empty_split(tmp_path, capsys):
    f = write_fixture_tree(tmp_path, ['dtd'])['dtd'] / 'split_zhou_DescribableTextures.json'
    _rewrite_split(f, train=[])
    assert load_script('verify').main(['--root', str(tmp_path), '--no-counts', '--datasets', 'dtd']) == 1
    assert 'the train split is empty' in capsys.readouterr().out


@pytest.mark.parametrize('shots', [0, -1, 1.5, True, '4'])
def test_bad_shots(tree, shots):
    with pytest.raises(UserError, match='shots must be a positive integer'): few_shot(load_splits('dtd', tree), shots)


def test_fixture_bad_arguments(tmp_path):
    with pytest.raises(UserError, match='choose from'): write_fixture_tree(tmp_path, ['mnist'])
    with pytest.raises(UserError, match='layout'): write_fixture_tree(tmp_path, ['dtd'], layout='dassl')


# ------------------------------------------------------------------------------------------- sampling

def reference_few_shot(splits, shots, seed):
    """A straightforward re-implementation of the published procedure (CLIP-LoRA's datasets/*.py and
    generate_fewshot_dataset), written independently of so_tutorial.data."""
    random.seed(seed)
    def per_label(items):
        out = defaultdict(list)
        for it in items: out[it.label].append(it)
        return out
    n_val = min(shots, 4)
    if splits.key == 'imagenet':
        train, val = [], []
        for label, items in per_label(splits.train).items():
            k = shots + n_val
            picked = random.sample(items, k) if len(items) >= k else random.choices(items, k=k)
            train = train + picked[0:shots]
            val = val + picked[shots:shots + n_val]
        return train, val
    def generate(data_source, num_shots):
        dataset = []
        for label, items in per_label(data_source).items():
            if len(items) >= num_shots: dataset.extend(random.sample(items, num_shots))
            else: dataset.extend(random.choices(items, k=num_shots))
        return dataset
    val = generate(splits.val, n_val)
    train = generate(splits.train, shots)
    return train, val


@pytest.fixture(scope='module')
def big(tmp_path_factory):
    "5 classes, 20/6/2 images per class, and a DTD split file whose items are shuffled (labels appear as 3,0,4,1,2...)."
    root = tmp_path_factory.mktemp('big')
    write_fixture_tree(root, ['dtd', 'oxford_pets', 'fgvc', 'imagenet'], n_classes=5, per_class=(20, 6, 2))
    f = root / 'dtd' / 'split_zhou_DescribableTextures.json'
    d = json.loads(f.read_text())
    rng = random.Random(0)
    for s in d.values(): rng.shuffle(s)
    f.write_text(json.dumps(d))
    return root


@pytest.mark.parametrize('key', ['dtd', 'oxford_pets', 'fgvc', 'imagenet'])
@pytest.mark.parametrize('shots', [1, 2, 4, 8, 16])
def test_sampling_matches_reference_index_for_index(big, key, shots):
    s = load_splits(key, big)
    for seed in (1, 2, 3):
        seed_everything(seed)
        got = few_shot(s, shots)
        assert got == reference_few_shot(s, shots, seed)
        train, val = got
        assert len(train) == 5 * shots and len(val) == 5 * min(shots, 4)
        assert all(sum(it.label == c for it in train) == shots for c in range(5))
        if key != 'imagenet':  # enough images: no repeats
            assert len({it.path for it in train}) == len(train)
            assert {it.path for it in train} <= {it.path for it in s.train}
            assert {it.path for it in val} <= {it.path for it in s.val}


def test_classes_visited_in_order_of_first_appearance(big):
    s = load_splits('dtd', big)
    first = list(dict.fromkeys(it.label for it in s.train))
    assert first != sorted(first)  # the shuffled split really differs from label order
    seed_everything(1)
    train, val = few_shot(s, 2)
    assert [it.label for it in train[::2]] == first
    assert [it.label for it in val[::2]] == list(dict.fromkeys(it.label for it in s.val))


def test_too_small_class_samples_with_replacement_and_logs(tmp_path, caplog):
    f = write_fixture_tree(tmp_path, ['dtd'], per_class=(6, 4, 2))['dtd'] / 'split_zhou_DescribableTextures.json'
    d = json.loads(f.read_text())
    d['train'] = [x for x in d['train'] if x[1] != 1][:-2] + [x for x in d['train'] if x[1] == 1][:2]  # label 1: 2 images
    f.write_text(json.dumps(d))
    s = load_splits('dtd', tmp_path)
    counts = {c: sum(it.label == c for it in s.train) for c in range(3)}
    assert counts[1] == 2 and min(counts[0], counts[2]) >= 4
    with caplog.at_level(logging.WARNING, logger='so_tutorial.data'):
        seed_everything(5)
        train, val = few_shot(s, 4)
    assert (train, val) == reference_few_shot(s, 4, 5)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and 'replacement' in warnings[0] and 'blotchy' in warnings[0] and 'dtd train' in warnings[0]
    ones = [it for it in train if it.label == 1]
    assert len(ones) == 4 and len({it.path for it in ones}) <= 2
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger='so_tutorial.data'):
        seed_everything(5); few_shot(s, 2)
    assert not caplog.records


def test_determinism_and_global_state(tree):
    s = load_splits('oxford_pets', tree)
    seed_everything(7); a = few_shot(s, 2)
    seed_everything(7); b = few_shot(s, 2)
    assert a == b
    c = few_shot(s, 2)  # consumes the global state further: another draw
    seed_everything(8); d = few_shot(s, 2)
    assert a != c and a != d
    seed_everything(7)
    r = random.random(); nr = np.random.rand(); tr = torch.rand(1)
    random.seed(7); np.random.seed(7); torch.manual_seed(7)
    assert (r, nr, tr.item()) == (random.random(), np.random.rand(), torch.rand(1).item())


def test_imagenet_few_shot(big):
    s = load_splits('imagenet', big)
    assert s.val == [] and len(s.test) == 5 * 2 and len(s.train) == 5 * 26
    wnids = sorted(p.name for p in (big / 'imagenet' / 'images' / 'train').iterdir())
    for c, w in enumerate(wnids):  # classes in sorted folder order, files in sorted order
        names = [it.path for it in s.train if it.label == c]
        assert names == sorted(names) and all(p.split('/')[-2] == w for p in names) and len(names) == 26
    assert all('/images/val/' in it.path for it in s.test)
    seed_everything(3)
    train, val = few_shot(s, 8)
    assert not {it.path for it in train} & {it.path for it in val}
    assert all(sum(it.label == c for it in val) == 4 for c in range(5))
    # per class one random.sample of shots + min(shots, 4) images: first `shots` train, the rest val
    random.seed(3)
    groups = defaultdict(list)
    for it in s.train: groups[it.label].append(it)
    expect = {c: random.sample(groups[c], 12) for c in range(5)}
    assert train == [it for c in range(5) for it in expect[c][:8]]
    assert val == [it for c in range(5) for it in expect[c][8:]]


def test_imagenet_too_small_class_logs(tree, caplog):
    s = load_splits('imagenet', tree)  # 6 train images per class
    with caplog.at_level(logging.WARNING, logger='so_tutorial.data'):
        seed_everything(1); train, val = few_shot(s, 4)
    assert len(train) == 12 and len(val) == 12
    assert len([r for r in caplog.records if 'replacement' in r.getMessage()]) == 3


# ------------------------------------------------------------------------------------------- lists, datasets, prompts

def test_item_list_round_trip(tree, tmp_path):
    s = load_splits('food101', tree)
    seed_everything(1); train, _ = few_shot(s, 3)
    p = write_item_list(tmp_path / 'run' / 'train_items.jsonl', train)
    assert read_item_list(p) == train
    lines = p.read_text().splitlines()
    assert len(lines) == len(train) and json.loads(lines[0]) == dict(path=train[0].path, label=train[0].label, classname=train[0].classname)
    assert sorted(x.name for x in p.parent.iterdir()) == ['train_items.jsonl']  # atomic: no temp file left
    with pytest.raises(UserError, match='does not exist'): read_item_list(tmp_path / 'none.jsonl')
    p.write_text(lines[0] + '\n{"path": "x"}\n')
    with pytest.raises(UserError, match=r'train_items.jsonl:2'): read_item_list(p)


def test_item_is_small_hashable_and_picklable():
    it = Item('dtd/images/a/b.jpg', 3, 'banded')
    assert pickle.loads(pickle.dumps(it)) == it and hash(it) == hash(Item('dtd/images/a/b.jpg', 3, 'banded'))
    assert not hasattr(it, '__dict__')
    with pytest.raises(Exception): it.label = 4


def test_image_list_dataset(tree):
    import torchvision.transforms as T
    s = load_splits('caltech101', tree)
    ds = ImageListDataset(s.test, tree, T.ToTensor())
    assert len(ds) == len(s.test) and ds.labels == [it.label for it in s.test]
    for i, it in enumerate(s.test):
        x, y = ds[i]
        assert y == it.label and x.shape == (3, 32, 32) and x.dtype == torch.float32
    img, y = ImageListDataset(s.test, tree)[0]
    assert img.mode == 'RGB' and img.size == (32, 32)
    xb, yb = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert xb.shape == (4, 3, 32, 32) and yb.tolist() == [it.label for it in s.test[:4]]


def test_image_list_dataset_names_unreadable_and_missing_files(tree, tmp_path):
    copy_tree(tree, tmp_path, ['dtd'])
    s = load_splits('dtd', tmp_path)
    (tmp_path / s.train[1].path).write_bytes(b'\xff\xd8 truncated jpeg')
    (tmp_path / s.train[2].path).unlink()
    ds = ImageListDataset(s.train, tmp_path)
    ds[0]
    with pytest.raises(UserError, match='cannot read image') as e: ds[1]
    assert str(tmp_path / s.train[1].path) in str(e.value)
    with pytest.raises(UserError) as e: ds[2]
    assert str(tmp_path / s.train[2].path) in str(e.value)
    with pytest.raises(UserError):
        list(torch.utils.data.DataLoader(ImageListDataset(s.train, tmp_path, lambda im: torch.zeros(1)), batch_size=4))


def test_prompts():
    assert prompts(['apple_pie', 'Annual Crop Land']) == ['a photo of a apple pie.', 'a photo of a Annual Crop Land.']
    assert prompts(['Apply_Eye_Makeup'], 'itap of a {}.') == ['itap of a Apply Eye Makeup.']
    assert prompts([]) == []


# ------------------------------------------------------------------------------------------- data_prep scripts

SCRIPTS = sorted(p.name for p in DATA_PREP.glob('*.py') if p.name != 'common.py')


def test_every_dataset_has_a_script():
    assert set(SCRIPTS) == {f'{k}.py' for k in KEYS} | {'verify.py', 'fixtures.py'}
    assert (DATA_PREP / 'README.md').is_file()


@pytest.mark.parametrize('script', SCRIPTS)
def test_script_help(script):
    r = subprocess.run([sys.executable, str(DATA_PREP / script), '--help'], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert 'usage: python data_prep/' in r.stdout and '--root' in r.stdout


def load_script(name):
    "Import data_prep/<name>.py as a module (its `main(argv)` runs in-process, much faster than a subprocess)."
    if str(DATA_PREP) not in sys.path: sys.path.insert(0, str(DATA_PREP))
    spec = importlib.util.spec_from_file_location(f'data_prep_{name}', DATA_PREP / f'{name}.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fixtures_and_verify_scripts(tmp_path, capsys):
    keys = ['dtd', 'oxford_pets', 'food101', 'eurosat', 'imagenet']
    assert load_script('fixtures').main(['--root', str(tmp_path), '--datasets', *keys]) == 0
    assert 'verify.py' in capsys.readouterr().out and (tmp_path / 'oxford_pets' / 'split_zhou_OxfordPets.json').is_file()
    verify = load_script('verify').main
    assert verify(['--root', str(tmp_path), '--no-counts', '--datasets', *keys]) == 0
    assert capsys.readouterr().out.count(': OK:') == 5
    assert verify(['--root', str(tmp_path), '--datasets', 'dtd']) == 1  # the counts differ from CoOp's
    out = capsys.readouterr().out
    assert 'expected 47' in out and 'expected 2820' in out

    pets, food = load_splits('oxford_pets', tmp_path), load_splits('food101', tmp_path)
    gone, broken = tmp_path / pets.test[0].path, tmp_path / food.val[1].path
    gone.unlink(); broken.write_bytes(b'GIF89a nonsense')
    empty = tmp_path / load_splits('imagenet', tmp_path).test[0].path
    empty.write_bytes(b'')
    (tmp_path / 'eurosat' / 'split_zhou_EuroSAT.json').unlink()
    # the real command line, once, in a subprocess
    r = subprocess.run([sys.executable, str(DATA_PREP / 'verify.py'), '--root', str(tmp_path), '--no-counts', '--datasets', *keys],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout
    assert f'missing: {gone}' in out and f'{broken}' in out and 'unreadable' in out and f'{empty}' in out
    assert 'split_zhou_EuroSAT.json is missing' in out and 'python data_prep/eurosat.py' in out
    assert 'dtd: OK' in out and '4 of 5 dataset(s) need attention' in out
    assert verify(['--root', str(tmp_path), '--no-counts', '--quick', '--datasets', 'oxford_pets', 'food101']) == 1
    out = capsys.readouterr().out
    assert f'missing: {gone}' in out and 'food101: OK' in out  # --quick only checks that files exist
    with pytest.raises(SystemExit) as e: verify(['--root', str(tmp_path), '--datasets', 'mnist'])
    assert e.value.code == 2 and 'choose from' in capsys.readouterr().err


# --- the arrange logic, fed archives laid out like the official ones (built from a fixture tree)

@pytest.fixture
def offline(monkeypatch):
    "Any download attempt fails the test."
    import torchvision.datasets.utils as u
    def boom(*a, **k): raise AssertionError(f'tried to download {a[:1]}')
    for name in ('download_url', 'download_and_extract_archive', 'download_file_from_google_drive'):
        monkeypatch.setattr(u, name, boom)


def pack(tmp, name, files, fmt='gztar'):
    "An archive `name` holding `files` ({path inside the archive: source file or folder})."
    pkg = tmp / f'pkg_{name}'
    for arc, src in files.items():
        (pkg / arc).parent.mkdir(parents=True, exist_ok=True)
        if src is None: (pkg / arc).write_text('x')
        elif Path(src).is_dir(): shutil.copytree(src, pkg / arc)
        else: shutil.copy2(src, pkg / arc)
    out = Path(shutil.make_archive(str(tmp / f'built_{name}'), fmt, root_dir=pkg))
    return out.rename(tmp / name)


def official_archives(key, f, tmp):
    "Archives shaped like the official downloads, from the fixture dataset folder `f`."
    if key == 'dtd': return [pack(tmp, 'dtd-r1.0.1.tar.gz', {'dtd/images': f / 'images', 'dtd/labels/labels_joint_anno.txt': None})]
    if key == 'eurosat': return [pack(tmp, 'EuroSAT.zip', {'2750': f / '2750'}, 'zip')]
    if key == 'caltech101':
        inner = pack(tmp, '101_ObjectCategories.tar.gz', {'101_ObjectCategories': f / '101_ObjectCategories'})
        return [pack(tmp, 'caltech-101.zip', {'caltech-101/101_ObjectCategories.tar.gz': inner,
                                              'caltech-101/show_annotation.m': None}, 'zip')]
    if key == 'oxford_pets': return [pack(tmp, 'images.tar.gz', {'images': f / 'images'}),
                                     pack(tmp, 'annotations.tar.gz', {'annotations/list.txt': None})]
    if key == 'oxford_flowers': return [pack(tmp, '102flowers.tgz', {'jpg': f / 'jpg'})]
    if key == 'food101': return [pack(tmp, 'food-101.tar.gz', {'food-101/images': f / 'images', 'food-101/meta/classes.txt': None})]
    if key == 'fgvc':
        files = {f'fgvc-aircraft-2013b/data/{p.name}': p for p in f.iterdir()}
        return [pack(tmp, 'fgvc-aircraft-2013b.tar.gz', {**files, 'fgvc-aircraft-2013b/evaluation.m': None})]
    if key == 'sun397': return [pack(tmp, 'SUN397.tar.gz', {'SUN397': f / 'SUN397', 'SUN397/ClassName.txt': None})]
    if key == 'ucf101': return [pack(tmp, 'UCF-101-midframes.zip', {'UCF-101-midframes': f / 'UCF-101-midframes'}, 'zip')]
    raise KeyError(key)


ARCHIVE_KEYS = ['dtd', 'eurosat', 'caltech101', 'oxford_pets', 'oxford_flowers', 'food101', 'fgvc', 'sun397', 'ucf101']


@pytest.mark.parametrize('key', ARCHIVE_KEYS)
def test_prepare_from_official_archives(tree, tmp_path, key, offline, capsys):
    spec = DATASETS[key]
    archives = official_archives(key, tree / spec.folders[0], tmp_path)
    root = tmp_path / 'data'
    folder = root / spec.folders[0]
    folder.mkdir(parents=True)
    if spec.kind == 'json': shutil.copy2(tree / spec.folders[0] / spec.split_file, folder)  # as if fetched from Drive
    if key == 'oxford_flowers':
        for extra in ('cat_to_name.json', 'imagelabels.mat'): (folder / extra).write_text('{}')
    argv = ['--root', str(root), '--no-counts', '--downloads', str(tmp_path / 'dl')]
    for a in archives: argv += ['--archive', str(a)]
    rc = load_script(key).main(argv)
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err
    assert f'{key}: OK' in out.out
    got, want = load_splits(key, root), load_splits(key, tree)
    assert got.classnames == want.classnames and (got.train, got.val, got.test) == (want.train, want.val, want.test)
    assert not (root / '_staging').exists()
    # a second run finds the images in place and downloads nothing
    assert load_script(key).main(['--root', str(root), '--no-counts']) == 0
    assert 'not downloading' in capsys.readouterr().out


def test_prepare_eurosat_from_zenodo_zip(tree, tmp_path, offline, capsys):
    a = pack(tmp_path, 'EuroSAT_RGB.zip', {'EuroSAT_RGB': tree / 'eurosat' / '2750'}, 'zip')
    root = tmp_path / 'data'; (root / 'eurosat').mkdir(parents=True)
    shutil.copy2(tree / 'eurosat' / 'split_zhou_EuroSAT.json', root / 'eurosat')
    assert load_script('eurosat').main(['--root', str(root), '--no-counts', '--archive', str(a)]) == 0
    assert (root / 'eurosat' / '2750').is_dir()


def test_prepare_into_existing_alias_folder(tree, tmp_path, offline, capsys):
    "A user with CLIP-LoRA's DTD/ folder (split file already there) gets the images in DTD/."
    a = official_archives('dtd', tree / 'dtd', tmp_path)[0]
    root = tmp_path / 'data'; (root / 'DTD').mkdir(parents=True)
    shutil.copy2(tree / 'dtd' / 'split_zhou_DescribableTextures.json', root / 'DTD')
    assert load_script('dtd').main(['--root', str(root), '--no-counts', '--archive', str(a)]) == 0
    assert (root / 'DTD' / 'images').is_dir() and not (root / 'dtd').exists()


def test_prepare_reports_a_missing_split_file(tree, tmp_path, monkeypatch, capsys):
    "Images in place, split file absent: the script tries Google Drive (here: offline) and exits 1 with a message."
    import torchvision.datasets.utils as u
    def offline_drive(*a, **k): raise RuntimeError('offline')
    monkeypatch.setattr(u, 'download_file_from_google_drive', offline_drive)
    root = copy_tree(tree, tmp_path, ['dtd'])
    (root / 'dtd' / 'split_zhou_DescribableTextures.json').unlink()
    assert load_script('dtd').main(['--root', str(root), '--no-counts']) == 1
    err = capsys.readouterr().err
    assert 'dtd: error' in err and ('gdown' in err or 'offline' in err)


def test_stanford_cars_from_kaggle_archive_and_folder(tree, tmp_path, offline, capsys):
    f = tree / 'stanford_cars'
    kaggle = {'cars_train/cars_train': f / 'cars_train', 'cars_test/cars_test': f / 'cars_test',
              'car_devkit/devkit/cars_meta.mat': None}
    a = pack(tmp_path, 'stanford-cars-dataset.zip', kaggle, 'zip')
    cars = load_script('stanford_cars')
    for how, source, extra in (('archive', a, []), ('folder', None, ['--link'])):
        root = tmp_path / how
        (root / 'stanford_cars').mkdir(parents=True)
        shutil.copy2(f / 'split_zhou_StanfordCars.json', root / 'stanford_cars')
        if source is None:
            source = tmp_path / 'kaggle_extracted'
            shutil.unpack_archive(a, source)
        assert cars.main(['--root', str(root), '--no-counts', '--from', str(source), *extra]) == 0, capsys.readouterr()
        assert load_splits('stanford_cars', root).test == [Item(it.path, it.label, it.classname) for it in load_splits('stanford_cars', tree).test]
    assert (tmp_path / 'folder' / 'stanford_cars' / 'cars_train').is_symlink()
    assert (tmp_path / 'archive' / 'stanford_cars' / 'devkit').is_dir()
    empty = tmp_path / 'empty'; empty.mkdir()
    assert cars.main(['--root', str(empty), '--no-counts']) == 1
    assert 'by hand' in capsys.readouterr().err
    (tmp_path / 'nothing' / 'cars_train').mkdir(parents=True)
    assert cars.main(['--root', str(empty), '--no-counts', '--from', str(tmp_path / 'nothing')]) == 1  # no jpgs there
    assert 'no folder cars_train/' in capsys.readouterr().err
    capsys.readouterr()


def test_imagenet_flat_val_and_sort_val(tree, tmp_path, offline, capsys):
    root = copy_tree(tree, tmp_path, ['imagenet'])
    before = load_splits('imagenet', root)
    val = root / 'imagenet' / 'images' / 'val'
    moved = []
    for d in sorted(p for p in val.iterdir() if p.is_dir()):
        for img in sorted(d.iterdir()): moved.append((img.name, d.name)); shutil.move(img, val / img.name)
        d.rmdir()
    with pytest.raises(UserError, match='--archives'): load_splits('imagenet', root)
    wnids = [w for _, w in sorted(moved)]  # the devkit's ground truth, in sorted file-name order
    load_script('imagenet').sort_val(val, wnids)
    after = load_splits('imagenet', root)
    assert after.test == before.test and after.train == before.train
    with pytest.raises(UserError, match='devkit lists'): load_script('imagenet').sort_val(val, wnids)  # no flat images left
    assert load_script('imagenet').main(['--root', str(root), '--no-counts']) == 0
    empty = tmp_path / 'empty'; empty.mkdir()
    assert load_script('imagenet').main(['--root', str(empty), '--no-counts']) == 1
    assert 'manual download' in capsys.readouterr().err
