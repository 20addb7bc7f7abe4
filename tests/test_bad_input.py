"Bad input and faults in the CLIP and BERT commands: a one-line error (exit 1), never a traceback, a hang or a silent reuse."
import contextlib, io, json, os, shutil, subprocess, sys, time
from pathlib import Path

import pytest
import torch

from so_tutorial import bert, clip, engine
from so_tutorial.cli import main
from so_tutorial.data import write_fixture_tree
from so_tutorial.engine import RESULT, FAILURE

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning', 'ignore::FutureWarning', 'ignore::DeprecationWarning')
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', 'PYTHONWARNINGS': 'ignore'}


def quiet(argv):
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def failed(code, err, *words):
    "Exit 1, a one-line error containing `words`, no traceback."
    assert code == 1, err
    assert 'Traceback' not in err and all(w in err for w in words), err
    return True


@pytest.fixture(scope='module')
def fx(tmp_path_factory):
    d = tmp_path_factory.mktemp('bad')
    write_fixture_tree(d / 'data', keys=['dtd'])
    (d / 'other').mkdir()
    return dict(d=d, root=d / 'data', tiny=clip.tiny_config(d / 'tiny.json'), other_tiny=clip.tiny_config(d / 'other' / 'tiny.json', layers=1),
                bert=str(bert.save_tiny_bert(d / 'tiny-bert')), rte=str(bert.write_toy_rte(d / 'rte')))


def clip_args(fx, out, method='so', *extra, root=None, backbone=None, **kw):
    a = ['clip', '--root', str(root or fx['root']), '--dataset', 'dtd', '--shots', '2', '--seed', '1', '--method', method,
         '--backbone', str(backbone or fx['tiny']),
         '--pretrained', 'none', '--n-iters', '2', '--batch-size', '4', '--lr', '1e-2', '--density-ratio', '0.05', '--device', 'cpu',
         '--workers', '0', '--output', str(out), *extra]
    for k, v in kw.items(): a[a.index(f"--{k.replace('_', '-')}") + 1] = str(v)
    return a


def bert_args(fx, out, *extra, data=None):
    return ['bert', '--method', 'so', '--model', fx['bert'], '--data', str(data or fx['rte']), '--kappa', '1e-2', '--max-length', '32',
            '--max-steps', '2', '--device', 'cpu', '--output', str(out), *extra]


@pytest.fixture
def nothing_built(monkeypatch):
    "Fail the test if a model or a data set is loaded."
    def built(*a, **kw): raise AssertionError('the model or the data was loaded before the bad option was refused')
    for mod, name in ((clip, 'load_clip'), (clip, 'load_splits'), (bert, 'load_model'), (bert, 'load_rte_splits')):
        monkeypatch.setattr(mod, name, built)


# --- options refused before anything is built ------------------------------------------------------

@pytest.mark.parametrize('lr', ['-1e-3', 'nan', 'inf', '0'])
def test_bad_learning_rate_refused_before_the_model_is_built(fx, tmp_path, nothing_built, lr):
    assert failed(*quiet(clip_args(fx, tmp_path, lr=lr))[::2], '--lr must be a positive number')
    a = bert_args(fx, tmp_path / 'b', '--lr', lr)
    assert failed(*quiet(a)[::2], '--lr must be a positive number')
    assert not list(tmp_path.rglob(RESULT))


def test_zero_iterations_refused(fx, tmp_path, nothing_built):
    assert failed(*quiet(clip_args(fx, tmp_path, n_iters=0))[::2], '--n-iters must be an integer >= 1')
    assert failed(*quiet(bert_args(fx, tmp_path, '--max-steps', '0'))[::2], '--max-steps must be >= 1')


@pytest.mark.parametrize('option, value, message', [('--early-stop-loss', 'nan', '--early-stop-loss must be'),
                                                    ('--lora-dropout', '1.5', '--lora-dropout must be'),
                                                    ('--workers', '-1', '--workers must be'), ('--device', 'gpu7', '--device')])
def test_other_bad_clip_options(fx, tmp_path, nothing_built, option, value, message):
    assert failed(*quiet(clip_args(fx, tmp_path) + [option, value])[::2], message)


# --- files -----------------------------------------------------------------------------------------

@pytest.mark.parametrize('content', [b'not a checkpoint at all', b'PK\x03\x04' + b'\0' * 40])
def test_corrupt_pretrained_file(fx, tmp_path, content):
    f = tmp_path / 'weights.pt'; f.write_bytes(content)
    code, _, err = quiet(clip_args(fx, tmp_path / 'out', 'zeroshot', '--pretrained', str(f)))
    assert failed(code, err, f'--pretrained {f} cannot be read as weights')


def test_truncated_checkpoint_of_the_right_model(fx, tmp_path):
    m, _ = clip.load_clip(fx['tiny'], 'none')
    torch.save(m.state_dict(), tmp_path / 'full.pt')
    (tmp_path / 'cut.pt').write_bytes((tmp_path / 'full.pt').read_bytes()[:20_000])
    assert failed(*quiet(clip_args(fx, tmp_path / 'out', 'zeroshot', '--pretrained', str(tmp_path / 'cut.pt')))[::2], 'cannot be read as weights')


def test_output_is_a_file(fx, tmp_path):
    f = tmp_path / 'not-a-folder'; f.write_text('x')
    assert failed(*quiet(clip_args(fx, f, 'zeroshot'))[::2], 'is a file, not a folder')
    assert failed(*quiet(bert_args(fx, f))[::2], 'is a file, not a folder')
    assert failed(*quiet(['sweep', 'bert', '--method', 'lora', '--ranks', '2', '--model', fx['bert'], '--data', fx['rte'],
                          '--max-length', '32', '--max-steps', '1', '--device', 'cpu', '--output', str(f)])[::2], 'is a file, not a folder')
    assert f.read_text() == 'x'


def test_output_not_writable(fx, tmp_path, monkeypatch):
    def denied(*a, **kw): raise PermissionError(13, 'Permission denied')
    monkeypatch.setattr(engine.tempfile, 'mkstemp', denied)  # what a read-only folder does (root ignores chmod)
    assert failed(*quiet(clip_args(fx, tmp_path / 'ro', 'zeroshot'))[::2], 'cannot write to', 'Permission denied')
    assert failed(*quiet(bert_args(fx, tmp_path / 'ro2'))[::2], 'cannot write to', 'Permission denied')


# --- data ------------------------------------------------------------------------------------------

def _split_without(fx, tmp_path, split):
    root = tmp_path / f'no_{split}'
    shutil.copytree(fx['root'], root)
    (f,) = root.rglob('split_zhou_*.json')
    j = json.loads(f.read_text()); j[split] = []; f.write_text(json.dumps(j))
    return root


def test_empty_test_split(fx, tmp_path):
    code, _, err = quiet(clip_args(fx, tmp_path / 'out', 'zeroshot', root=_split_without(fx, tmp_path, 'test')))
    assert failed(code, err) and 'test' in err


def test_empty_training_split_stops_quickly(fx, tmp_path):
    "The run that once spun at 100 % CPU: it ends with a one-line error (in a fresh process, so that a hang fails the test)."
    root = _split_without(fx, tmp_path, 'train')
    t = time.time()
    p = subprocess.run([sys.executable, '-m', 'so_tutorial.cli', *clip_args(fx, tmp_path / 'out', root=root)[0:]], env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert failed(p.returncode, p.stderr.strip()) and 'train' in p.stderr.lower(), p.stderr[-2000:]
    assert not list((tmp_path / 'out').rglob(RESULT))


@pytest.mark.parametrize('name, text', [('train.jsonl', ''), ('train.csv', 'sentence1,sentence2,label\n'),
                                        ('validation.jsonl', '\n\n')])
def test_empty_bert_file(fx, tmp_path, name, text):
    data = tmp_path / 'data'; shutil.copytree(fx['rte'], data)
    if name.endswith('.csv'): (data / 'train.jsonl').unlink()
    (data / name).write_text(text)
    code, _, err = quiet(bert_args(fx, tmp_path / 'out', data=data))
    assert failed(code, err, f'{name} has no examples') and 'StopIteration' not in err


# --- finished runs are matched by their config -------------------------------------------------------

def test_clip_finished_run_of_another_backbone_is_not_reused(fx, tmp_path):
    assert quiet(clip_args(fx, tmp_path, 'zeroshot'))[0] == 0
    other = clip_args(fx, tmp_path, 'zeroshot', backbone=fx['other_tiny'])  # same file name, another model: same folder
    assert clip._config(clip._parser('x').parse_args(other[1:]), dataset='dtd', shots=2, seed=1, method='zeroshot').run_id() == \
           clip._config(clip._parser('x').parse_args(clip_args(fx, tmp_path, 'zeroshot')[1:]), dataset='dtd', shots=2, seed=1, method='zeroshot').run_id()
    code, out, err = quiet(other)
    assert failed(code, err, 'holds the result of another run', '--backbone', str(fx['tiny']), str(fx['other_tiny']))
    assert 'finished already' not in out
    sweep = ['sweep', 'clip', '--root', str(fx['root']), '--datasets', 'dtd', '--shots', '2', '--seeds', '1', '--methods', 'zeroshot',
             '--backbone', str(fx['other_tiny']), '--pretrained', 'none', '--device', 'cpu', '--workers', '0', '--output', str(tmp_path)]
    before = sorted(tmp_path.rglob('*'))
    assert failed(*quiet(sweep)[::2], 'holds the result of another run', '--backbone')
    assert sorted(tmp_path.rglob('*')) == before  # refused before anything ran


def test_clip_density_that_prints_alike_is_another_run(fx, tmp_path):
    a, b = (clip.ClipConfig(density_ratio=d, device='cpu').resolved().run_id() for d in (0.01, 0.010000001))
    assert a != b and b.endswith('so_d0.010000001_T5')


def test_bert_sweep_refuses_a_folder_of_another_model(fx, tmp_path):
    model = tmp_path / 'tiny-bert'; shutil.copytree(fx['bert'], model)
    sweep = ['sweep', 'bert', '--method', 'lora', '--ranks', '2', '--model', str(model), '--data', fx['rte'], '--max-length', '32',
             '--max-steps', '1', '--device', 'cpu', '--output', str(tmp_path / 'grid')]
    assert quiet(sweep)[0] == 0
    shutil.rmtree(model); bert.save_tiny_bert(model, seed=1)  # another model under the same folder name
    code, out, err = quiet(sweep)
    assert failed(code, err, 'holds the result of another run', '--model is')
    one = ['bert', '--method', 'lora', '--rank', '2', '--model', str(model), '--data', fx['rte'], '--max-length', '32', '--max-steps', '1',
           '--device', 'cpu', '--output', str(tmp_path / 'grid' / 'seed42' / 'lora_r2_max1_len32')]
    assert failed(*quiet(one)[::2], 'holds the result of another run', '--model is')


# --- sweeps: what this process did, what the folder holds, and failed reruns -------------------------

def _zeroshot_sweep(fx, out, *extra, seeds=('1', '2')):
    return ['sweep', 'clip', '--root', str(fx['root']), '--datasets', 'dtd', '--shots', '1', '--seeds', *seeds, '--methods', 'zeroshot',
            '--backbone', str(fx['tiny']), '--pretrained', 'none', '--device', 'cpu', '--workers', '0', '--output', str(out), *extra]


def test_two_sweeps_on_one_folder_report_what_each_did(fx, tmp_path):
    busy = tmp_path / 'dtd/1shot/seed2/zeroshot_tiny-none'
    holder = subprocess.Popen([sys.executable, '-c', 'import sys, time; from so_tutorial.io import claim; '
                               'print(claim(sys.argv[1]), flush=True); time.sleep(600)', str(busy)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == 'True'  # "another sweep" is running the seed-2 job
        code, out, err = quiet(_zeroshot_sweep(fx, tmp_path))
    finally: holder.kill(); holder.wait()
    assert code == 0, err
    assert 'this process: 2 job(s): 1 ran, 1 claimed by another process' in out
    assert "holds 1 of the grid's 2 runs finished, 1 not finished" in out
    code, out, err = quiet(_zeroshot_sweep(fx, tmp_path))
    assert code == 0 and '1 ran, 1 finished before' in out and "holds 2 of the grid's 2 runs finished" in out, out


def test_failed_force_rerun_keeps_the_finished_result(fx, tmp_path, monkeypatch):
    assert quiet(_zeroshot_sweep(fx, tmp_path, seeds=('1',)))[0] == 0
    (res,) = tmp_path.rglob(RESULT)
    good = res.read_bytes()
    def crash(*a, **kw): raise RuntimeError('CUDA out of memory')
    monkeypatch.setattr(clip, 'run', crash)
    code, out, err = quiet(_zeroshot_sweep(fx, tmp_path, '--force', seeds=('1',)))
    assert code == 1 and '1 failed' in out and 'failed here' in out
    assert res.read_bytes() == good  # the finished result stays, the failure is beside it
    assert 'CUDA out of memory' in json.loads((res.parent / FAILURE).read_text())['error']
    with pytest.raises(RuntimeError, match='out of memory'):  # a single run that crashes replaces nothing either
        quiet(clip_args(fx, tmp_path, 'zeroshot', shots='1') + ['--force'])
    assert res.read_bytes() == good


def test_sweeps_refuse_torchrun(fx, tmp_path, monkeypatch):
    "A sweep is one process per GPU: under torchrun both sweep commands stop with a one-line error before writing anything."
    for k, v in dict(RANK='0', WORLD_SIZE='2', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1', MASTER_PORT='29500').items(): monkeypatch.setenv(k, v)
    clip_sweep = ['sweep', 'clip', '--root', str(fx['root']), '--datasets', 'dtd', '--shots', '1', '--seeds', '1', '--methods', 'zeroshot',
                  '--backbone', str(fx['tiny']), '--pretrained', 'none', '--device', 'cpu', '--workers', '0', '--output', str(tmp_path / 'c')]
    bert_sweep = ['sweep', 'bert', '--method', 'lora', '--ranks', '2', '--model', fx['bert'], '--data', fx['rte'], '--max-length', '32',
                  '--max-steps', '1', '--device', 'cpu', '--output', str(tmp_path / 'b')]
    for argv in (clip_sweep, bert_sweep):
        assert failed(*quiet(argv)[::2], 'one sweep per GPU', '--shard', 'torchrun')
    assert not any(tmp_path.iterdir())
