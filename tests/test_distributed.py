"Data parallel under torchrun (gloo on CPU): 2 ranks give the parameters of 1 rank with the same global batch, ranks agree."
import json, os, socket, subprocess, sys, textwrap
from pathlib import Path

import pytest
import torch

from so_tutorial import bert, clip
from so_tutorial.data import write_fixture_tree

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning', 'ignore::FutureWarning', 'ignore::DeprecationWarning')
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', 'PYTHONWARNINGS': 'ignore'}
LR, TOL = 1e-3, 1e-5


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def torchrun(n, *args):
    "Start `python -m torch.distributed.run --nproc-per-node n ...` on 127.0.0.1 with a free port."
    return subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--nproc-per-node', str(n), '--master-addr', '127.0.0.1',
                             '--master-port', str(free_port()), *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p, timeout=300):
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err[-3000:]
    return out


@pytest.fixture(scope='module')
def fx(tmp_path_factory):
    d = tmp_path_factory.mktemp('ddp')
    write_fixture_tree(d / 'data', keys=['dtd'])
    nodrop = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # so that 1 and 2 ranks compute the same thing
    return dict(d=d, root=d / 'data', tiny=clip.tiny_config(d / 'tiny.json'), bert=str(bert.save_tiny_bert(d / 'tiny-bert', **nodrop)),
                rte=str(bert.write_toy_rte(d / 'rte')))


def clip_cmd(fx, out, *extra):
    return ['-m', 'so_tutorial.cli', 'clip', '--root', str(fx['root']), '--dataset', 'dtd', '--shots', '2', '--method', 'so',
            '--backbone', str(fx['tiny']), '--pretrained', 'none', '--n-iters', '6', '--batch-size', '4', '--lr', str(LR),
            '--density-ratio', '0.05', '--T', '3', '--early-stop-loss', '0', '--device', 'cpu', '--workers', '0', '--check-sync', '1',
            '--output', str(out), *extra]


def bert_cmd(fx, out, *extra):
    return ['-m', 'so_tutorial.cli', 'bert', '--method', 'so', '--model', fx['bert'], '--data', fx['rte'], '--kappa', '1e-2', '--T', '3',
            '--max-length', '32', '--loss-stop', '0', '--max-steps', '10', '--device', 'cpu', '--check-sync', '1',
            '--output', str(out), *extra]


@pytest.fixture(scope='module')
def runs(fx):
    "Every launch at once: CLIP SO with dense gradients and with the sparse backward, BERT SO with the sparse backward; 1 and 2 ranks."
    launches = {(kind, sb, n): torchrun(n, *(clip_cmd if kind == 'clip' else bert_cmd)(fx, fx['d'] / f'{kind}{sb}_{n}', *sb.split()))
                for kind, sb in (('clip', ''), ('clip', '--sparse-backward'), ('bert', '--sparse-backward')) for n in (1, 2)}
    for p in launches.values(): finish(p)
    return {k: fx['d'] / f'{k[0]}{k[1]}_{k[2]}' for k in launches}


def clip_weights(fx, root):
    "The trained matrices of the run below `root`: the pretrained ones with the saved sparse delta applied."
    (run,) = [p.parent for p in Path(root).rglob('result.json')]
    model, _ = clip.load_clip(fx['tiny'], 'none')
    mats = clip.trainable_matrices(model)
    clip.apply_delta(mats, torch.load(run / 'delta.pt', weights_only=True)['tensors'])
    return {n: p.detach().clone() for n, p in mats.items()}, json.loads((run / 'result.json').read_text())


@pytest.mark.parametrize('sb', ['', '--sparse-backward'])
def test_clip_two_ranks_equal_one(fx, runs, sb):
    (w1, r1), (w2, r2) = (clip_weights(fx, runs['clip', sb, n]) for n in (1, 2))
    assert (r1['world_size'], r2['world_size']) == (1, 2) and r1['sparse_backward'] == r2['sparse_backward'] == bool(sb)
    assert r2['steps'] == r1['steps'] == 12 and r2['correct'] == r1['correct']
    pretrained = clip.trainable_matrices(clip.load_clip(fx['tiny'], 'none')[0])
    moved = max((w1[n] - pretrained[n]).abs().max().item() for n in w1)
    diff = max((w1[n] - w2[n]).abs().max().item() for n in w1)
    assert moved > 100 * TOL and diff < TOL, (moved, diff)  # they trained, and 2 ranks x 2 images == 1 rank x 4 images
    for e1, e2 in zip(r1['epochs'], r2['epochs']): assert e1['loss'] == pytest.approx(e2['loss'], rel=1e-5)


def test_sparse_backward_under_ddp_matches_dense_gradients(fx, runs):
    (w_dense, _), (w_sb, _) = (clip_weights(fx, runs['clip', sb, 2]) for sb in ('', '--sparse-backward'))
    assert max((w_dense[n] - w_sb[n]).abs().max().item() for n in w_dense) < TOL


def test_bert_two_ranks_equal_one(runs):
    r1, r2 = (json.loads((runs['bert', '--sparse-backward', n] / 'result.json').read_text()) for n in (1, 2))
    assert (r1['world_size'], r2['world_size']) == (1, 2) and r2['steps'] == r1['steps'] == 10
    assert r2['val_correct'] == r1['val_correct']
    l1, l2 = ((runs['bert', '--sparse-backward', n] / 'train_loss.csv').read_text().splitlines()[1:] for n in (1, 2))
    assert [float(x.split(',')[1]) for x in l2] == pytest.approx([float(x.split(',')[1]) for x in l1], rel=1e-5)


HELPERS = textwrap.dedent(r'''
    import json, sys, torch, torch.distributed as dist
    from torch import nn
    from so_tutorial.optim import SO
    from so_tutorial.sparse import SparseBackward, all_reduce_sparse_grads
    from so_tutorial.engine import init_distributed, dist_info, broadcast_object, check_in_sync
    init_distributed('cpu'); rank, world = dist_info()
    out = dict(rank=rank, world=world, seed=broadcast_object(1234 if rank == 0 else None))
    # the sparse values, averaged over the ranks, equal the averaged dense gradient at S
    torch.manual_seed(0); lin = nn.Linear(6, 5)
    opt = SO([lin.weight], density_ratio=0.3, generator=torch.Generator().manual_seed(7)); SparseBackward(lin, opt)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(100 + rank))  # every rank its own data
    lin(x).square().sum().backward()
    all_reduce_sparse_grads(opt)
    S, got = opt.state[lin.weight]['grad_support'], opt.sparse_grads[lin.weight]
    w = lin.weight.detach().clone().requires_grad_()
    g = torch.autograd.grad(nn.functional.linear(x, w, lin.bias.detach()).square().sum(), w)[0]
    dist.all_reduce(g); g /= world
    out['sparse_err'] = (got - g.reshape(-1)[S]).abs().max().item()
    out['same_support'] = broadcast_object(S.tolist()) == S.tolist()
    # --check-sync passes when the ranks agree and names the tensor when they do not
    t = {'a': torch.ones(3), 'b': torch.arange(4.)}
    check_in_sync(t, 1)
    if rank == 1: t['b'][2] += 1e-6
    try: check_in_sync(t, 2); out['drift'] = None
    except RuntimeError as e: out['drift'] = str(e)
    json.dump(out, open(f"{sys.argv[1]}/rank{rank}.json", 'w'))
    dist.barrier(); dist.destroy_process_group()
''')


def test_helpers_under_gloo(tmp_path):
    (tmp_path / 'helpers.py').write_text(HELPERS)
    finish(torchrun(2, str(tmp_path / 'helpers.py'), str(tmp_path)))
    outs = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in (0, 1)]
    for r, o in enumerate(outs):
        assert (o['rank'], o['world'], o['seed']) == (r, 2, 1234) and o['same_support']
        assert o['sparse_err'] < 1e-5
        assert o['drift'] and 'after step 2' in o['drift'] and 'values of b ' in o['drift']
