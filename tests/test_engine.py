"The shared training engine (so_tutorial.engine) on a toy pipeline, run folders and records, and the structure of the pipelines."
import argparse, ast, json, math, os, signal, warnings
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from torch import nn

from so_tutorial import engine
from so_tutorial.engine import (RunConfig, Training, EpochData, train, run_training, run_record, finished_run, finish_run, record_failure,
                                result_exists, check_output, content_id, load_resume, save_resume, Interrupted, RESULT, FAILURE, RESUME_FILE)
from so_tutorial.io import UserError
from so_tutorial.optim import SO

LIB = Path(engine.__file__).parent


# --- a toy pipeline --------------------------------------------------------------------------------

@dataclass
class Toy(RunConfig):
    data: str = None
    PIPELINE, METHODS = 'toy', ('so', 'adam')
    ARM_KEYS = {'so': ('density_ratio', 'T')}
    def run_id(self): return f'{self.method}_{self.lr}'
    def identity(self): return {**RunConfig.identity(self), 'data': content_id(self.data)}


class Batches(EpochData):
    "Batches of 8 of 40 points; epoch e's order from (seed, e); `sigint_at` sends SIGINT when that epoch starts."
    def __init__(self, x, y, seed=0, sigint_at=None): self.x, self.y, self.seed, self.sigint_at = x, y, seed, sigint_at
    def epoch(self, st):
        if st['epoch'] == self.sigint_at and st['pos'] == 0: os.kill(os.getpid(), signal.SIGINT)
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.seed * 1000 + st['epoch']))
        batches = [order[i:i + 8] for i in range(0, len(order), 8)]
        return [len(b) for b in batches], ((self.x[i], self.y[i]) for i in batches[st['pos']:])


def toy(lr=0.05, n=40, method='so', sigint_at=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g); y = (x[:, 0] > 0).long()
    torch.manual_seed(0); net = nn.Linear(8, 2)
    opt = (SO([dict(params=[net.weight]), dict(params=[net.bias], dense=True)], lr=lr, density_ratio=0.25, T=2) if method == 'so'
           else torch.optim.Adam(net.parameters(), lr=lr))
    return Training(module=net, forward=lambda m, b: (m(b[0]), b[1]), data=Batches(x, y, sigint_at=sigint_at), opt=opt,
                    sched=torch.optim.lr_scheduler.CosineAnnealingLR(opt, 50), trained=dict(net.named_parameters()))


CFG = Toy(lr=0.05, density_ratio=0.25, device='cpu').resolved()


# --- the loop --------------------------------------------------------------------------------------

def test_stop_rules():
    st = train(toy(), 30, progress=False)
    assert (st['step'], st['reason'], len(st['losses']), len(st['epochs'])) == (30, 'max_steps', 30, 6)
    ep = st['epochs'][0]  # the epoch mean is the sample-weighted mean of its mini-batch losses
    assert ep['loss'] == pytest.approx(sum(st['losses'][:5]) / 5) and ep['step'] == 5
    first = next(i for i, l in enumerate(st['losses']) if l <= st['losses'][7])  # a threshold met first at some step
    b = train(toy(), 30, stop_batch_loss=st['losses'][first], progress=False)
    assert (b['step'], b['reason']) == (first + 1, 'loss_stop')
    e = train(toy(), 30, stop_epoch_loss=st['epochs'][2]['loss'] + 1e-9, progress=False)
    assert e['reason'] == 'loss_stop' and e['step'] % 5 == 0 and e['step'] <= 15
    # a loss rule met at the last step still reports loss_stop (the batch rule is checked first)
    assert train(toy(), 5, stop_batch_loss=10, progress=False)['reason'] == 'loss_stop'


def test_nonfinite_steps_stop_or_are_skipped():
    with pytest.raises(UserError, match='non-finite loss or gradient at step 2.*--skip-nonfinite'):
        train(toy(lr=float('inf')), 5, progress=False)
    with pytest.warns(UserWarning, match='step skipped'):
        st = train(toy(lr=float('inf')), 5, progress=False, skip_nonfinite=True)
    assert st['skipped'] == [2, 3, 4, 5] and st['step'] == 5 and math.isnan(st['losses'][-1])


def test_no_checkpoint_from_nonfinite_weights(tmp_path):
    t = toy(lr=float('inf'))  # the first step makes the weights infinite (skipping later steps would not help)
    with pytest.raises(UserError, match='after step 1 .* the checkpoint was not written'):
        run_training(t, replace(CFG, skip_nonfinite=True, checkpoint_every=1), tmp_path, 5, progress=False)
    assert not (tmp_path / RESUME_FILE).exists() and not list(tmp_path.glob('*.tmp'))


def test_empty_training_data_is_an_error_not_a_spin():
    t = toy(n=0)
    with pytest.raises(UserError, match='the training set is empty'): train(t, 5, progress=False)


def test_resume_is_exact_and_checks_the_weights(tmp_path):
    full = toy(); torch.manual_seed(1); ref, _ = run_training(full, CFG, tmp_path / 'ref2', 30, progress=False)
    stopped = toy(sigint_at=3); torch.manual_seed(1)
    with pytest.raises(Interrupted, match='stopped by SIGINT after step 16 of 30'):
        run_training(stopped, CFG, tmp_path / 'run', 30, progress=False)
    assert torch.load(tmp_path / 'run' / RESUME_FILE, weights_only=True)['step'] == 16
    again = toy(); torch.manual_seed(99)  # another global generator state: it comes from the checkpoint
    st, started = run_training(again, CFG, tmp_path / 'run', 30, resume=True, progress=False)
    assert started == 16 and st['losses'] == ref['losses']
    assert all(torch.equal(again.trained[n], full.trained[n]) for n in full.trained)
    with pytest.raises(UserError, match='--T is 5 there, 3 here'):
        run_training(toy(), replace(CFG, T=3), tmp_path / 'run', 30, resume=True, progress=False)
    other = toy(); other.trained['weight'].data += 1
    with pytest.raises(UserError, match='started from other weights'):
        run_training(other, CFG, tmp_path / 'run', 30, resume=True, progress=False)


def test_every_rank_needs_a_part_of_every_batch():
    engine._check_batches([4, 4, 1], 1)
    with pytest.raises(UserError, match='with 2 processes every batch needs at least 2 examples'): engine._check_batches([4, 4, 1], 2)


def test_checkpoint_of_an_older_format_is_refused(tmp_path):
    torch.save(dict(format='so_tutorial.resume/1'), tmp_path / RESUME_FILE)
    with pytest.raises(UserError, match='not a resume checkpoint of this version'): load_resume(tmp_path / RESUME_FILE, CFG)


# --- configs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('lr', [-1e-3, 0., float('nan'), float('inf'), None])
def test_learning_rate_must_be_positive_and_finite(lr):
    with pytest.raises(UserError, match='--lr must be a positive number'): Toy(lr=lr).resolved()


def test_identity_and_record():
    so, adam = CFG, Toy(method='adam', lr=0.05, device='cpu').resolved()
    assert 'density_ratio' in so.record() and 'density_ratio' not in adam.record()  # the other arm's settings are left out
    assert 'device' in so.record() and 'device' not in so.identity()                 # operational settings are not identity
    assert Toy.from_record(so.record()) == so


# --- run folders -----------------------------------------------------------------------------------

def test_finished_run_is_matched_by_identity_and_content(tmp_path):
    f = tmp_path / 'data.txt'; f.write_text('one')
    c = replace(CFG, data=str(f))
    finish_run(tmp_path / 'r', dict(identity=c.identity(), config=c.record()))
    assert finished_run(tmp_path / 'r', c)['config'] == c.record()
    with pytest.raises(UserError, match=r'--lr is 0.05 there, 0.050000001 here.*--force'):
        finished_run(tmp_path / 'r', replace(c, lr=0.050000001))
    f.write_text('two')  # same file name, other content: another run
    with pytest.raises(UserError, match=r"--data is .*data.txt \(sha256:.*there, .*data.txt \(sha256:.* here"):
        finished_run(tmp_path / 'r', c)
    assert finished_run(tmp_path / 'nothing', c) is None


def test_result_written_before_identities_is_matched_by_its_config(tmp_path):
    finish_run(tmp_path, dict(config=CFG.record()))  # an old result.json: no identity field
    assert finished_run(tmp_path, CFG) is not None
    with pytest.raises(UserError, match='--T is 5 there, 7 here'): finished_run(tmp_path, replace(CFG, T=7))


def test_failed_rerun_keeps_the_finished_result(tmp_path):
    record_failure(tmp_path, dict(error='first try'))
    assert json.loads((tmp_path / RESULT).read_text())['status'] == 'failed'
    finish_run(tmp_path, dict(acc=1))
    record_failure(tmp_path, dict(error='boom'))
    assert json.loads((tmp_path / RESULT).read_text())['acc'] == 1 and json.loads((tmp_path / FAILURE).read_text())['error'] == 'boom'
    finish_run(tmp_path, dict(acc=2))
    assert not (tmp_path / FAILURE).exists() and result_exists(tmp_path)


def test_output_that_is_a_file_or_not_writable(tmp_path, monkeypatch):
    (tmp_path / 'f').write_text('x')
    with pytest.raises(UserError, match='is a file, not a folder'): check_output(tmp_path / 'f' / 'run')
    with pytest.raises(UserError, match='is a file, not a folder'): check_output(tmp_path / 'f')
    def denied(*a, **kw): raise PermissionError(13, 'Permission denied')
    monkeypatch.setattr(engine.tempfile, 'mkstemp', denied)
    with pytest.raises(UserError, match='cannot write to .*Permission denied'): check_output(tmp_path / 'ro')


@pytest.mark.skipif(hasattr(os, 'geteuid') and os.geteuid() == 0, reason='root writes into read-only folders')
def test_read_only_output(tmp_path):
    ro = tmp_path / 'ro'; ro.mkdir(); ro.chmod(0o555)
    try:
        with pytest.raises(UserError, match='cannot write to'): check_output(ro / 'run')
    finally: ro.chmod(0o755)


def test_record_has_the_engine_fields():
    st = train(toy(), 6, progress=False)
    t = toy()
    r = run_record(CFG, st, 0, (0, 1, 2, 3), t.trained)
    assert (r['steps'], r['stop_reason'], r['final_loss'], r['config'], r['identity']) == (6, 'max_steps', st['losses'][-1], CFG.record(), CFG.identity())
    assert r['peak_memory_bytes'] > 0 and r['machine']['device'] == 'cpu' and len(r['trained_sha1']) == 40


# --- the pipelines' structure ----------------------------------------------------------------------

def _top_level_names(path):
    "Names of the functions and classes a module defines; a `@patch`ed function is a method: 'Class.name'."
    out = set()
    for n in ast.parse(Path(path).read_text()).body:
        if isinstance(n, ast.ClassDef): out.add(n.name)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            patched = any(isinstance(d, ast.Name) and d.id == 'patch' for d in n.decorator_list)
            out.add(f'{ast.unparse(n.args.args[0].annotation)}.{n.name}' if patched else n.name)
    return out


def test_clip_and_bert_share_no_function_but_cli_and_evaluation():
    shared = _top_level_names(LIB / 'clip.py') & _top_level_names(LIB / 'bert.py')
    assert shared <= {'cli', 'sweep_cli', 'evaluate'}, shared
    assert {'cli', 'sweep_cli', 'evaluate', 'ClipConfig.resolved'} <= _top_level_names(LIB / 'clip.py')  # the check sees functions and methods


def _parsers():
    from so_tutorial import bert, clip
    return [clip._parser('so-tutorial clip'), clip._parser('so-tutorial sweep clip', sweep=True),
            bert._bert_parser('so-tutorial bert'), bert._bert_parser('so-tutorial sweep bert', sweep=True)]


@pytest.mark.parametrize('i', range(4))
def test_every_option_has_help_and_one_default(i):
    ap = _parsers()[i]
    fmt = ap._get_formatter()
    for a in ap._actions:
        assert a.help and a.help.strip(), f'{ap.prog}: {a.option_strings} has no help'
        text = fmt._expand_help(a)
        assert 'default: None' not in text and text.count('default') <= 1, f'{ap.prog} {a.option_strings}: {text!r}'
    assert 'SPEC' not in ap.format_help() and 'quirk' not in ap.format_help().lower()
