"Exact resume of CLIP and BERT runs (SIGKILL, SIGTERM), safe sweeps (kill, two processes), non-finite steps, bad checkpoints."
import contextlib, io, json, os, shutil, signal, subprocess, sys, time
from pathlib import Path

import pytest
import torch

from so_tutorial import bert, clip
from so_tutorial.cli import main
from so_tutorial.data import write_fixture_tree
from so_tutorial.engine import RESUME_FILE

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning', 'ignore::FutureWarning', 'ignore::DeprecationWarning')
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', 'PYTHONWARNINGS': 'ignore'}


@pytest.fixture(scope='module')
def fx(tmp_path_factory):
    d = tmp_path_factory.mktemp('resume')
    write_fixture_tree(d / 'data', keys=['dtd'])
    return dict(root=d / 'data', tiny=clip.tiny_config(d / 'tiny.json'), tiny3=clip.tiny_config(d / 'tiny3.json', layers=3),
                bert=str(bert.save_tiny_bert(d / 'tiny-bert')), rte=str(bert.write_toy_rte(d / 'rte')), d=d)


def clip_args(fx, out, *extra, n_iters=100, backbone=None):
    return ['clip', '--root', str(fx['root']), '--dataset', 'dtd', '--shots', '2', '--method', 'so',
            '--backbone', str(backbone or fx['tiny']), '--pretrained', 'none', '--n-iters', str(n_iters), '--batch-size', '2',
            '--lr', '1e-2', '--density-ratio', '0.05', '--early-stop-loss', '0', '--device', 'cpu', '--workers', '0',
            '--output', str(out), *extra]


def bert_args(fx, out, *extra, steps=120):
    return ['bert', '--method', 'so', '--model', fx['bert'], '--data', fx['rte'], '--kappa', '1e-2', '--max-length', '32',
            '--loss-stop', '0', '--max-steps', str(steps), '--device', 'cpu', '--output', str(out), *extra]


def start(args):
    "The CLI in a fresh process (one thread, offline)."
    return subprocess.Popen([sys.executable, '-m', 'so_tutorial.cli', *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(p, timeout=240):
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def wait_for(cond, p, what, timeout=300):  # generous: the machine may be shared
    "Poll `cond()` until true; fail if the process `p` ends first."
    t = time.time()
    while not cond():
        assert p.poll() is None, f'the run ended before {what}: {p.communicate()[1][-2000:]}'
        assert time.time() - t < timeout, f'timed out waiting for {what}'
        time.sleep(0.005)


def attempts(run_dir):
    p = Path(run_dir) / 'attempts.jsonl'
    return [json.loads(l) for l in p.read_text().splitlines()] if p.exists() else []


def quiet(argv):
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def clip_run_dir(fx, root, **kw):
    c = clip.ClipConfig(root=str(fx['root']), dataset='dtd', shots=2, method='so', backbone=str(kw.pop('backbone', fx['tiny'])),
                        pretrained='none', n_iters=kw.pop('n_iters', 100), batch_size=2, lr=kw.pop('lr', 1e-2), density_ratio=0.05,
                        early_stop_loss=0, device='cpu', workers=0, **kw)
    return Path(root) / c.run_id()


# --- kill and resume -------------------------------------------------------------------------------

def test_clip_sigkill_then_sigterm_then_resume_is_exact(fx):
    ref_root, root = fx['d'] / 'clip_ref', fx['d'] / 'clip_kill'
    run, ref_run = clip_run_dir(fx, root), clip_run_dir(fx, ref_root)
    ref = start(clip_args(fx, ref_root))                                    # uninterrupted, no checkpoints
    p = start(clip_args(fx, root, '--checkpoint-every', '2'))
    wait_for(lambda: (run / RESUME_FILE).exists(), p, 'the first checkpoint')
    p.send_signal(signal.SIGKILL); p.wait()
    assert not (run / 'result.json').exists()
    step1 = torch.load(run / RESUME_FILE, weights_only=True)['step']
    assert 0 < step1 < 200 and step1 % 2 == 0
    code, _, err = quiet(clip_args(fx, root, '--checkpoint-every', '2'))    # a checkpoint is there: not without --resume
    assert code == 1 and 'pass --resume' in err
    # resume, and stop it with SIGTERM as soon as it trains again: it writes a checkpoint and exits 143
    p = start(clip_args(fx, root, '--checkpoint-every', '2', '--resume'))
    wait_for(lambda: len(attempts(run)) == 2, p, 'the resumed run to train')
    p.send_signal(signal.SIGTERM)
    code, _, err = finish(p)
    assert code == 128 + signal.SIGTERM and 'stopped by SIGTERM' in err and '--resume' in err, err[-2000:]
    step2 = torch.load(run / RESUME_FILE, weights_only=True)['step']
    assert step1 < step2 < 200 and not (run / 'result.json').exists()
    code, _, err = finish(start(clip_args(fx, root, '--checkpoint-every', '2', '--resume')))
    assert code == 0, err[-2000:]
    code, _, err = finish(ref)
    assert code == 0, err[-2000:]
    a, b = (json.loads((d / 'result.json').read_text()) for d in (ref_run, run))
    assert [x['resumed_from'] for x in attempts(run)] == [0, step1, step2] and b['resumed_from_step'] == step2
    assert (b['correct'], b['steps'], b['epochs'], b['trained_sha1']) == (a['correct'], a['steps'], a['epochs'], a['trained_sha1'])
    da, db = (torch.load(d / 'delta.pt', weights_only=True)['tensors'] for d in (ref_run, run))
    assert da.keys() == db.keys() and len(da) > 0
    assert all(torch.equal(da[n]['indices'], db[n]['indices']) and torch.equal(da[n]['values'], db[n]['values']) for n in da)
    assert not (run / RESUME_FILE).exists()  # deleted once the run finished


def test_bert_sigkill_then_resume_is_exact(fx):  # with the sparse backward: supports drawn before the backward resume too
    ref_out, out = fx['d'] / 'bert_ref', fx['d'] / 'bert_kill'
    ref = start(bert_args(fx, ref_out, '--sparse-backward'))
    p = start(bert_args(fx, out, '--sparse-backward', '--checkpoint-every', '2'))
    wait_for(lambda: (out / RESUME_FILE).exists(), p, 'the first checkpoint')
    p.send_signal(signal.SIGKILL); p.wait()
    assert not (out / 'result.json').exists()
    step = torch.load(out / RESUME_FILE, weights_only=True)['step']
    assert 0 < step < 120
    code, _, err = finish(start(bert_args(fx, out, '--sparse-backward', '--checkpoint-every', '2', '--resume')))
    assert code == 0, err[-2000:]
    code, _, err = finish(ref)
    assert code == 0, err[-2000:]
    a, b = (json.loads((d / 'result.json').read_text()) for d in (ref_out, out))
    assert b['resumed_from_step'] == step and [x['resumed_from'] for x in attempts(out)] == [0, step]
    assert b['config']['sparse_backward'] and (b['val_correct'], b['steps'], b['trained_sha1']) == (a['val_correct'], a['steps'], a['trained_sha1'])
    assert (out / 'train_loss.csv').read_text() == (ref_out / 'train_loss.csv').read_text()  # every loss, bit for bit


# --- sweeps ----------------------------------------------------------------------------------------

def sweep_args(fx, out, *extra):
    return ['sweep', 'clip', '--root', str(fx['root']), '--datasets', 'dtd', '--shots', '2', '--seeds', '1', '2',
            '--methods', 'so', 'adam', '--backbone', str(fx['tiny']), '--pretrained', 'none', '--n-iters', '60', '--batch-size', '2',
            '--lr', '1e-2', '--density-ratio', '0.05', '--early-stop-loss', '0', '--device', 'cpu', '--workers', '0',
            '--output', str(out), *extra]


def test_sweeps_two_processes_run_each_job_once_and_a_killed_sweep_resumes(fx):
    both, killed = fx['d'] / 'sweep_both', fx['d'] / 'sweep_killed'
    procs = [start(sweep_args(fx, both)) for _ in range(2)]  # two sweeps, same grid, same folder, at once
    victim = start(sweep_args(fx, killed, '--checkpoint-every', '2'))
    results = lambda root: sorted(Path(root).rglob('result.json'))
    wait_for(lambda: len(results(killed)) == 1 and list(killed.rglob(RESUME_FILE)), victim, 'a checkpoint of the second job')
    victim.send_signal(signal.SIGKILL); victim.wait()
    (interrupted,) = [p.parent for p in killed.rglob(RESUME_FILE)]
    first = results(killed)[0]; done = first.stat().st_mtime_ns
    for p in procs:
        code, _, err = finish(p)
        assert code == 0, err[-2000:]
    runs = [p.parent for p in results(both)]
    assert len(runs) == 4 and all(json.loads((r / 'result.json').read_text())['status'] == 'ok' for r in runs)
    assert [len(attempts(r)) for r in runs] == [1, 1, 1, 1]  # every configuration ran exactly once
    # the killed sweep, rerun: the finished job is skipped, the interrupted one resumes, the others run
    code, _, err = finish(start(sweep_args(fx, killed, '--checkpoint-every', '2')))
    assert code == 0, err[-2000:]
    assert first.stat().st_mtime_ns == done and len(attempts(interrupted)) == 2 and attempts(interrupted)[1]['resumed_from'] > 0
    for r in runs:
        a, b = (json.loads((root / r.relative_to(both) / 'result.json').read_text()) for root in (both, killed))
        assert b['status'] == 'ok' and (b['trained_sha1'], b['correct']) == (a['trained_sha1'], a['correct']), r
    assert not list(killed.rglob(RESUME_FILE)) and not list(killed.rglob('.claim'))


# --- non-finite steps ------------------------------------------------------------------------------

def test_nonfinite_loss_stops_or_is_skipped(fx, tmp_path):
    # lr 1e30: the first step blows the weights up, the second step's loss is NaN
    code, _, err = quiet(clip_args(fx, tmp_path / 'stop', '--lr', '1e30', n_iters=5))
    assert code == 1 and 'non-finite loss or gradient at step 2' in err and '--skip-nonfinite' in err
    assert not list((tmp_path / 'stop').rglob('result.json'))
    with pytest.warns(UserWarning, match='step skipped'):
        code, _, err = quiet(clip_args(fx, tmp_path / 'skip', '--lr', '1e30', '--skip-nonfinite', n_iters=5))
    assert code == 0, err
    (r,) = [json.loads(p.read_text()) for p in (tmp_path / 'skip').rglob('result.json')]
    assert r['skipped_steps'] == list(range(2, 11)) and r['steps'] == 10
    code, _, err = quiet(bert_args(fx, tmp_path / 'bert', '--trainer', '--skip-nonfinite', steps=6))
    assert code == 1 and 'need the plain loop' in err  # transformers.Trainer has its own ways


def test_bert_nonfinite_gradient_is_named(fx, tmp_path, monkeypatch):
    real = bert.prepare
    def poisoned(cfg):  # a NaN weight in the classifier: the loss and the gradients are NaN from step 1
        r = real(cfg)
        with torch.no_grad(): r['model'].classifier.weight[0, 0] = float('nan')
        return r
    monkeypatch.setattr(bert, 'prepare', poisoned)
    code, _, err = quiet(bert_args(fx, tmp_path / 'a', steps=4))
    assert code == 1 and 'non-finite loss or gradient at step 1' in err
    with pytest.warns(UserWarning, match='step skipped'):
        code, _, err = quiet(bert_args(fx, tmp_path / 'b', '--skip-nonfinite', steps=4))
    assert code == 0, err
    assert json.loads((tmp_path / 'b' / 'result.json').read_text())['skipped_steps'] == [1, 2, 3, 4]


def test_no_checkpoint_from_nonfinite_weights(fx, tmp_path):
    # lr 1e38 (an infinite lr is refused up front) overflows SO's first step size lr/(1-β1) to inf: the weights are inf/NaN after
    # step 1, and skipping the NaN steps does not make them finite again
    code, _, err = quiet(clip_args(fx, tmp_path, '--lr', '1e38', '--skip-nonfinite', '--checkpoint-every', '1', n_iters=5))
    assert code == 1 and 'the checkpoint was not written' in err and 'after step 1' in err
    assert not list(tmp_path.rglob(RESUME_FILE)) and not list(tmp_path.rglob('*.tmp'))


# --- bad checkpoints -------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def leftover(fx, tmp_path_factory):
    "The resume checkpoint of a CLIP run that crashed after training (its evaluation failed)."
    root = tmp_path_factory.mktemp('leftover')
    real = clip.evaluate
    clip.evaluate = lambda *a, **kw: (_ for _ in ()).throw(RuntimeError('crash'))
    try:
        with pytest.raises(RuntimeError, match='crash'), contextlib.redirect_stderr(io.StringIO()):
            main(clip_args(fx, root, '--checkpoint-every', '3', n_iters=4))
    finally: clip.evaluate = real
    ck = clip_run_dir(fx, root, n_iters=4) / RESUME_FILE
    assert ck.exists() and torch.load(ck, weights_only=True)['step'] == 6
    return ck


@pytest.mark.parametrize('change, backbone, message', [
    (dict(lr=2e-2), None, "lr is 0.01 there, 0.02 here"),
    (dict(), 'tiny3', "backbone is"),
])
def test_mismatched_checkpoint_is_refused(fx, leftover, tmp_path, change, backbone, message):
    kw = dict(n_iters=4, backbone=fx[backbone] if backbone else None)
    run = clip_run_dir(fx, tmp_path, lr=change.get('lr', 1e-2), **{k: v for k, v in kw.items() if v is not None})
    run.mkdir(parents=True); shutil.copy(leftover, run / RESUME_FILE)
    args = clip_args(fx, tmp_path, '--resume', **kw)
    if 'lr' in change: args[args.index('--lr') + 1] = str(change['lr'])
    code, _, err = quiet(args)
    assert code == 1 and 'belongs to another run' in err and message in err, err
    assert not (run / 'result.json').exists()


def test_truncated_checkpoint_is_refused_and_good_one_resumes(fx, leftover, tmp_path):
    run = clip_run_dir(fx, tmp_path, n_iters=4); run.mkdir(parents=True)
    (run / RESUME_FILE).write_bytes(leftover.read_bytes()[:len(leftover.read_bytes()) // 2])
    code, _, err = quiet(clip_args(fx, tmp_path, '--resume', n_iters=4))
    assert code == 1 and 'truncated or corrupted' in err
    shutil.copy(leftover, run / RESUME_FILE)
    code, _, err = quiet(clip_args(fx, tmp_path, '--resume', n_iters=4))
    assert code == 0, err
    r = json.loads((run / 'result.json').read_text())
    assert r['resumed_from_step'] == 6 and r['steps'] == 8


def test_bert_checkpoint_of_another_run_is_refused(fx, tmp_path, monkeypatch):
    monkeypatch.setattr(bert, 'evaluate', lambda *a, **kw: (_ for _ in ()).throw(RuntimeError('crash')))
    with pytest.raises(RuntimeError, match='crash'): quiet(bert_args(fx, tmp_path / 'a', '--checkpoint-every', '2', steps=4))
    monkeypatch.undo()
    ck = tmp_path / 'a' / RESUME_FILE
    assert torch.load(ck, weights_only=True)['step'] == 4
    (tmp_path / 'b').mkdir(); shutil.copy(ck, tmp_path / 'b' / RESUME_FILE)
    code, _, err = quiet(bert_args(fx, tmp_path / 'b', '--resume', '--kappa', '1e-1', steps=4))
    assert code == 1 and '--kappa is 0.01 there, 0.1 here' in err
    ck.write_bytes(b'not a checkpoint')
    code, _, err = quiet(bert_args(fx, tmp_path / 'a', '--resume', steps=4))
    assert code == 1 and 'truncated or corrupted' in err
