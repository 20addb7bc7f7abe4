"The `so-tutorial` entry point (--help, --version) and `so-tutorial results` over damaged result files."
import contextlib, io, json, logging, os, shutil, subprocess, sys
from pathlib import Path

import pandas as pd
import pytest

import so_tutorial
from so_tutorial.cli import main
from so_tutorial.results import collect, read_results, write_fake_runs

REPO = Path(__file__).resolve().parent.parent


def run(argv):
    "main(argv) in-process: (exit code, stdout, stderr)."
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): code = main(argv)
    return code, out.getvalue(), err.getvalue()


def version_in_settings():
    return next(l.split('=', 1)[1].strip() for l in (REPO / 'settings.ini').read_text().splitlines() if l.startswith('version'))


# ------------------------------------------------------------------------------------------- --version

@pytest.mark.parametrize('flag', ['--version', '-V'])
def test_version(flag):
    code, out, err = run([flag])
    assert code == 0 and err == ''
    assert out.split() == ['so-tutorial', so_tutorial.__version__]
    assert so_tutorial.__version__ == version_in_settings()


def test_help_lists_version():
    code, out, _ = run(['--help'])
    assert code == 0 and '--version' in out and '-V' in out and '--help' in out
    code, out, _ = run([])
    assert code == 2 and '--version' in out
    code, out, _ = run(['sweep', '--help'])
    assert code == 0 and '--version' not in out  # only the top level has it


def test_version_from_the_command_line():
    "The module entry point, in a fresh process (what the console script runs)."
    env = {**os.environ, 'PYTHONPATH': str(REPO)}
    r = subprocess.run([sys.executable, '-m', 'so_tutorial.cli', '--version'], capture_output=True, text=True, cwd=REPO,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f'so-tutorial {version_in_settings()}'


# ------------------------------------------------------------------------------------------- damaged result.json

def damage(runs):
    "Four kinds of bad result.json next to good runs: truncated, empty, not an object, not UTF-8; and one missing a field."
    bad = {'truncated': '{"kind": "clip", "dataset": "dtd", "top1": 6', 'empty': '', 'list': '[1, 2]', 'binary': b'\xff\xfe\x00{'}
    paths = {}
    for name, content in bad.items():
        p = runs / 'dtd' / '4shot' / f'seed_{name}' / 'so' / 'result.json'
        p.parent.mkdir(parents=True)
        (p.write_bytes if isinstance(content, bytes) else p.write_text)(content)
        paths[name] = p
    good = json.loads(next(runs.rglob('seed1/*/result.json')).read_text())
    del good['top1']
    p = runs / 'dtd' / '4shot' / 'seed_nofield' / 'so' / 'result.json'
    p.parent.mkdir(parents=True); p.write_text(json.dumps(good))
    paths['nofield'] = p
    return paths


def test_read_results_skips_unreadable_files_with_a_warning(tmp_path, caplog):
    runs = write_fake_runs(tmp_path / 'runs', datasets=('dtd',), seeds=(1, 2))
    paths = damage(runs)
    with caplog.at_level(logging.WARNING, logger='so_tutorial.results'):
        got = read_results(runs)
    assert len(got) == 4 + 1  # the 4 fake runs and the one missing a field (read_results does not judge fields)
    for name in ('truncated', 'empty', 'list', 'binary'):
        assert f'skipping {paths[name]}' in caplog.text, name
    assert 'JSONDecodeError' in caplog.text and 'UnicodeDecodeError' in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger='so_tutorial.results'):
        df = collect(runs)
    assert len(df) == 4 and f"skipping {paths['nofield']}" in caplog.text and "'top1'" in caplog.text


def test_results_command_over_a_truncated_result(tmp_path, capfd):
    "The command makes its table from the good runs, warns naming each bad file, and exits 0 (no traceback)."
    runs = write_fake_runs(tmp_path / 'runs', datasets=('dtd', 'eurosat'), seeds=(1, 2, 3))
    paths = damage(runs)
    out_dir = tmp_path / 'res'
    r = subprocess.run([sys.executable, '-m', 'so_tutorial.cli', 'results', '--runs', str(runs), '--out', str(out_dir)],
                       capture_output=True, text=True, cwd=tmp_path, env={**os.environ, 'PYTHONPATH': str(REPO)}, timeout=300)
    assert r.returncode == 0, r.stderr
    assert 'Traceback' not in r.stderr
    for p in paths.values(): assert str(p) in r.stderr
    assert len(pd.read_csv(out_dir / 'runs.csv')) == 2 * 3 * 2


def test_results_command_with_only_bad_files_and_bad_out(tmp_path):
    runs = tmp_path / 'runs'
    (runs / 'a').mkdir(parents=True)
    (runs / 'a' / 'result.json').write_text('{')
    code, _, err = run(['results', '--runs', str(runs), '--out', str(tmp_path / 'res')])
    assert code == 1 and 'no finished CLIP result.json' in err
    good = write_fake_runs(tmp_path / 'good', datasets=('dtd',))
    (tmp_path / 'file').write_text('x')
    code, _, err = run(['results', '--runs', str(good), '--out', str(tmp_path / 'file')])
    assert code == 1 and '--out' in err and 'cannot write there' in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------- empty data through `so-tutorial clip`

def _empty_split_argv(tmp_path, split):
    from so_tutorial.clip import tiny_config
    from so_tutorial.data import write_fixture_tree
    f = write_fixture_tree(tmp_path / 'data', ['dtd'])['dtd'] / 'split_zhou_DescribableTextures.json'
    f.write_text(json.dumps({**json.loads(f.read_text()), split: []}))
    return f, ['clip', '--root', str(tmp_path / 'data'), '--dataset', 'dtd', '--shots', '2', '--method', 'so',
               '--backbone', str(tiny_config(tmp_path / 'tiny.json')), '--pretrained', 'none', '--n-iters', '3',
               '--batch-size', '4', '--device', 'cpu', '--workers', '0', '--output', str(tmp_path / 'runs')]


def test_clip_command_refuses_an_empty_train_split(tmp_path):
    "A split file with an empty train list used to make CLIP training spin forever: now one error line and exit 1."
    f, argv = _empty_split_argv(tmp_path, 'train')
    r = subprocess.run([sys.executable, '-m', 'so_tutorial.cli', *argv], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, 'PYTHONPATH': str(REPO)}, timeout=300)  # a hang fails here instead of blocking
    assert r.returncode == 1, r.stdout + r.stderr
    assert 'Traceback' not in r.stderr and 'the train split is empty' in r.stderr and str(f) in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not list((tmp_path / 'runs').rglob('result.json'))


def test_clip_command_refuses_an_empty_test_split(tmp_path):
    "An empty test split used to end in a torch.cat error after training."
    f, argv = _empty_split_argv(tmp_path, 'test')
    code, _, err = run(argv)
    assert code == 1 and 'the test split is empty' in err and str(f) in err and len(err.strip().splitlines()) == 1
    assert not list((tmp_path / 'runs').rglob('result.json'))
