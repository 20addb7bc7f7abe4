"CLIP few-shot pipeline (so_tutorial.clip, so_tutorial.results) on a tiny CLIP and fixture datasets, offline."
import contextlib, copy, io, json, os, socket, subprocess, time
from pathlib import Path

import pytest
import torch
from torch import nn

from so_tutorial import clip
from so_tutorial.cli import main
from so_tutorial.data import write_fixture_tree
from so_tutorial.io import UserError
from so_tutorial.results import write_fake_runs, write_tables, collect, PAPER_4SHOT

METHODS = ('zeroshot', 'so', 'adam', 'lora')


def quiet(argv):
    "Run the CLI with stdout/stderr captured; return (exit code, stdout, stderr)."
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp('clip')
    write_fixture_tree(d / 'data', keys=['dtd', 'eurosat'])
    return dict(root=d / 'data', tiny=clip.tiny_config(d / 'tiny.json'), tiny12=clip.tiny_config(d / 'tiny12.json', layers=12),
                out=d / 'runs', tmp=d)


def argv_for(env, method, dataset='dtd', out=None, **kw):
    a = ['clip', '--root', str(env['root']), '--dataset', dataset, '--shots', '2', '--seed', '1', '--method', method,
         '--backbone', str(env['tiny']), '--pretrained', 'none', '--n-iters', '5', '--batch-size', '4', '--lr', '1e-2',
         '--density-ratio', '0.05', '--device', 'cpu', '--workers', '0', '--output', str(out or env['out'])]
    for k, v in kw.items(): a += [f"--{k.replace('_', '-')}", str(v)]
    return a


def cfg_for(env, method, **kw):
    base = dict(root=str(env['root']), dataset='dtd', shots=2, seed=1, method=method, backbone=str(env['tiny']), pretrained='none',
                n_iters=5, batch_size=4, lr=1e-2, density_ratio=0.05, device='cpu', workers=0)
    return clip.ClipConfig(**{**base, **kw}).resolved()


@pytest.fixture(scope='module')
def runs(env):
    "Every method once through the CLI: {method: (exit code, run dir)}."
    out = {}
    for m in METHODS:
        code, _, err = quiet(argv_for(env, m))
        out[m] = (code, env['out'] / cfg_for(env, m).run_id(), err)
    return out


# --- the model -------------------------------------------------------------------------------------

@pytest.mark.parametrize('batch_first', [True, False])
def test_split_attention_equals_fused(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first)
    split = clip.SplitAttention(mha)
    x = torch.randn(3, 7, 32) if batch_first else torch.randn(7, 3, 32)
    causal = torch.full((7, 7), float('-inf')).triu(1)
    pad = torch.zeros(3, 7, dtype=torch.bool); pad[0, -2:] = True
    for kw in (dict(), dict(attn_mask=causal), dict(attn_mask=causal.isinf()), dict(key_padding_mask=pad)):
        want = mha(x, x, x, need_weights=False, **kw)[0]
        got = split(x, x, x, need_weights=False, **kw)[0]
        assert torch.allclose(got, want, atol=1e-6), kw
    with torch.no_grad(): split.q_proj.weight[0, 0] += 1  # the test can fail
    assert not torch.allclose(split(x, x, x)[0], mha(x, x, x, need_weights=False)[0], atol=1e-6)


def test_split_model_equals_fused_model(env):
    model, tok = clip.load_clip(env['tiny'], 'none')
    img, txt = torch.randn(2, 3, 32, 32), tok(['a photo of a cat.', 'a dog'])
    split = copy.deepcopy(model)
    names = clip.split_attention(split)
    assert len(names) == 3 * 4 and all(isinstance(b.attn, clip.SplitAttention) for b in split.transformer.resblocks)
    for mode in ('eval', 'train'):
        getattr(model, mode)(); getattr(split, mode)()
        with torch.no_grad():
            assert torch.allclose(split.encode_image(img), model.encode_image(img), atol=1e-5)
            assert torch.allclose(split.encode_text(txt), model.encode_text(txt), atol=1e-5)


def test_load_clip_is_deterministic_and_keeps_global_rng(env):
    torch.manual_seed(123); want = torch.rand(3)
    torch.manual_seed(123)
    a, _ = clip.load_clip(env['tiny'], 'none')
    assert torch.equal(torch.rand(3), want)  # building the model did not consume the global RNG
    b, _ = clip.load_clip(env['tiny'], 'none')
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert a.visual.preprocess_cfg['size'] == (32, 32)
    train_tf, test_tf = clip.clip_transforms(a)
    from PIL import Image
    assert test_tf(Image.new('RGB', (50, 40))).shape == (3, 32, 32)


def test_vitb16_architecture_counts():
    with torch.device('meta'):
        import open_clip
        m = open_clip.create_model('ViT-B-16', pretrained=None, device='meta')
    mats = clip.trainable_matrices(m)
    assert len(mats) == 96 and sum(p.numel() for p in mats.values()) == 122_683_392
    assert clip.resolve_backbone('ViT-B-16', 'openai')['quick_gelu'] is True


@pytest.mark.parametrize('encoder', clip.ENCODERS)
@pytest.mark.parametrize('position', list(clip.POSITIONS))
def test_trainable_selection_counts(env, encoder, position):
    model, _ = clip.load_clip(env['tiny12'], 'none')
    mats = clip.trainable_matrices(model, encoder, position)
    blocks = len(clip.POSITIONS[position]) * (2 if encoder == 'both' else 1)
    assert len(mats) == 4 * blocks
    assert sum(p.numel() for p in mats.values()) == blocks * 12 * 32 * 32  # 3d² + d² + 4d² + 4d² per block
    idx = set(clip.POSITIONS[position])
    for n in mats:
        assert n.startswith('visual.' if encoder == 'vision' else 'transformer.' if encoder == 'text' else ('visual.', 'transformer.'))
        assert int(n.split('resblocks.')[1].split('.')[0]) in idx
        assert n.split('resblocks.')[1].split('.', 1)[1] in clip.MATRICES
    clip.freeze_except(model, mats.values())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(mats)


def test_positions_other_depths():
    assert clip.block_indices('bottom', 24) == list(range(8))
    assert clip.block_indices('top3', 24) == list(range(18, 24))
    assert clip.block_indices('up', 2) == [1] and clip.block_indices('bottom', 2) == [0]
    with pytest.raises(UserError, match='selects no block'): clip.block_indices('mid', 2)
    with pytest.raises(UserError, match='unknown --position'): clip.block_indices('middle', 12)


def test_lora_recipe(env):
    model, tok = clip.load_clip(env['tiny'], 'none')
    txt = tok(['a photo of a cat.'])
    with torch.no_grad(): before = model.encode_text(txt)
    lora = clip.add_lora(model, 'both', 'all', r=2, alpha=1.0, dropout=0.25)
    assert len(lora) == 2 * 2 * 3 * 2  # towers × blocks × (q, k, v) × (A, B)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora)
    q = model.visual.transformer.resblocks[1].attn.q_proj
    assert q.scaling['default'] == pytest.approx(1 / 2 ** 0.5) and q.lora_dropout['default'].p == 0.25
    model.eval()
    with torch.no_grad(): assert torch.allclose(model.encode_text(txt), before, atol=1e-5)  # B = 0 at init
    text_only, _ = clip.load_clip(env['tiny'], 'none')
    assert all(n.startswith('transformer.') for n in clip.add_lora(text_only, 'text'))


# --- checkpoints -----------------------------------------------------------------------------------

def test_sparse_delta_restores_exactly(env):
    model, _ = clip.load_clip(env['tiny'], 'none')
    mats = clip.trainable_matrices(model)
    base = {n: p.detach().clone() for n, p in mats.items()}
    opt = clip.SO(list(mats.values()), lr=1e-2, density_ratio=0.01, T=2)
    for _ in range(4):
        loss = sum((p ** 2).sum() for p in mats.values())
        loss.backward(); opt.step()
    delta = clip.sparse_delta(mats, base)
    for n, d in delta.items():
        changed = (mats[n].detach() != base[n]).flatten()
        assert len(d['indices']) == int(changed.sum()) and changed[d['indices'].long()].all()  # only changed entries
    assert 0 < sum(len(d['indices']) for d in delta.values()) < 0.1 * sum(b.numel() for b in base.values())
    fresh, _ = clip.load_clip(env['tiny'], 'none')
    fm = clip.trainable_matrices(fresh)
    clip.apply_delta(fm, delta)
    assert all(torch.equal(fm[n], mats[n]) for n in mats)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))


# --- runs through the CLI --------------------------------------------------------------------------

@pytest.mark.parametrize('method', METHODS)
def test_method_end_to_end(runs, method):
    code, d, err = runs[method]
    assert code == 0, err
    r = json.loads((d / 'result.json').read_text())
    assert r['status'] == 'ok' and r['method'] == method and r['run_id'] == str(d.relative_to(d.parents[3]))
    for k in ('config', 'versions', 'machine', 'device', 'zero_shot_top1', 'top1', 'steps', 'early_stopped', 'wall_s',
              'peak_memory_bytes', 'checkpoint', 'few_shot_list'):
        assert k in r, k
    assert r['total'] == 6 and 0 <= r['top1'] <= 100 and r['peak_memory_bytes'] > 0
    items = (d / 'train_items.jsonl').read_text().splitlines()
    assert len(items) == 3 * 2 and all(json.loads(x)['path'].startswith('dtd/') for x in items)
    if method == 'zeroshot':
        assert r['steps'] == 0 and r['top1'] == r['zero_shot_top1'] and r['checkpoint'] is None
        return
    ck = d / clip.CHECKPOINTS[method]
    assert ck.is_file() and r['checkpoint']['bytes'] == ck.stat().st_size
    assert r['checkpoint']['bytes'] < r['checkpoint']['full_checkpoint_bytes']
    losses = [e['loss'] for e in r['epochs']]
    assert 0 < r['steps'] <= 10 and losses[-1] < losses[0]  # the fixture is learnable: the loss falls
    if method == 'so':
        assert 0 < r['checkpoint']['changed_entries'] < r['checkpoint']['trained_weights']


@pytest.mark.parametrize('method', ['so', 'adam', 'lora'])
def test_eval_only_reproduces_accuracy(env, runs, method):
    code, d, _ = runs[method]
    r = json.loads((d / 'result.json').read_text())
    code, out, err = quiet(argv_for(env, method) + ['--eval-only'])
    assert code == 0, err
    ev = json.loads((d / 'eval_only.json').read_text())
    assert ev['matches'] and (ev['correct'], ev['total']) == (r['correct'], r['total'])


def test_eval_only_detects_a_mismatch(env, runs, tmp_path):
    import shutil
    _, d, _ = runs['so']
    copy_ = tmp_path / 'runs' / d.relative_to(env['out'])
    shutil.copytree(d, copy_)
    r = json.loads((copy_ / 'result.json').read_text())
    (copy_ / 'result.json').write_text(json.dumps({**r, 'correct': r['correct'] - 1}))  # a record this model does not reproduce
    code, _, err = quiet(argv_for(env, 'so', out=tmp_path / 'runs') + ['--eval-only'])
    assert code == 1 and 'differs from the recorded' in err
    assert json.loads((copy_ / 'eval_only.json').read_text())['matches'] is False


def test_existing_result_is_skipped_unless_force(env, runs):
    _, d, _ = runs['zeroshot']
    before = (d / 'result.json').stat().st_mtime_ns
    code, out, _ = quiet(argv_for(env, 'zeroshot'))
    assert code == 0 and 'finished already' in out and (d / 'result.json').stat().st_mtime_ns == before
    time.sleep(0.01)
    code, _, _ = quiet(argv_for(env, 'zeroshot') + ['--force'])
    assert code == 0 and (d / 'result.json').stat().st_mtime_ns != before


def test_checkpoint_validation(env, runs, tmp_path):
    _, d, _ = runs['so']
    c = cfg_for(env, 'so')
    model, *_ = clip._prepare(c)
    with pytest.raises(UserError, match='backbone'):
        clip.restore(model, clip.ClipConfig(**{**c.__dict__, 'backbone': str(env['tiny12'])}), d)
    # same backbone path, other architecture: the shapes differ
    other = tmp_path / 'tiny.json'
    other.write_text(env['tiny'].read_text().replace('"width": 32', '"width": 48'))
    ck = torch.load(d / 'delta.pt', weights_only=True)
    c2 = clip.ClipConfig(**{**c.__dict__, 'backbone': str(other)}).resolved()
    ck['meta'].update(backbone=str(other), hparams=clip.run_name(c2))
    clip.save_checkpoint(tmp_path / 'delta.pt', ck['kind'], ck['tensors'], ck['meta'])
    m2, *_ = clip._prepare(c2)
    with pytest.raises(UserError, match='shape'): clip.restore(m2, c2, tmp_path)
    # same architecture, other pretrained weights: the hash differs
    m3, *_ = clip._prepare(c)
    with torch.no_grad(): next(iter(clip.trainable_matrices(m3).values())).add_(1)
    with pytest.raises(UserError, match='differ from those'): clip.restore(m3, c, d)


# --- sweeps and results ----------------------------------------------------------------------------

def test_sweep_resumes_after_an_interrupted_run(env, tmp_path, monkeypatch):
    out = tmp_path / 'sweep'
    args = ['sweep', 'clip', '--root', str(env['root']), '--datasets', 'dtd', '--shots', '1', '--seeds', '1',
            '--methods', 'zeroshot', 'so', '--backbone', str(env['tiny']), '--pretrained', 'none', '--n-iters', '10',
            '--batch-size', '2', '--density-ratio', '0.05', '--early-stop-loss', '0', '--device', 'cpu', '--workers', '0',
            '--output', str(out)]
    first, second = (out / f'dtd/1shot/seed1/{n}' for n in ('zeroshot_tiny-none', 'so_d0.05_T5_tiny-none_it10_bs2_es0'))
    run_training = clip.run_training
    def interrupted(*a, **kw): raise KeyboardInterrupt  # Ctrl-C in the middle of the second run
    monkeypatch.setattr(clip, 'run_training', interrupted)
    with pytest.raises(KeyboardInterrupt): quiet(args)
    assert (first / 'result.json').exists() and (second / 'train_items.jsonl').exists() and not (second / 'result.json').exists()
    # a SIGKILL leaves the claim behind: the claim of a process that is gone
    dead = subprocess.Popen(['true']); dead.wait()
    (second / '.claim').write_text(json.dumps(dict(host=socket.gethostname(), pid=dead.pid, time=time.time())))
    monkeypatch.setattr(clip, 'run_training', run_training)
    done = (first / 'result.json').stat().st_mtime_ns
    code, _, err = quiet(args)
    assert code == 0, err
    assert (first / 'result.json').stat().st_mtime_ns == done  # the finished run was skipped
    r = json.loads((second / 'result.json').read_text())
    assert r['status'] == 'ok' and r['steps'] == 10 and not (second / '.claim').exists()
    assert len(list(out.rglob('result.json'))) == 2


def test_sweep_shard_and_jobs(env, tmp_path):
    args = ['sweep', 'clip', '--root', str(env['root']), '--datasets', 'dtd,eurosat', '--shots', '1', '2', '--seeds', '1',
            '--methods', 'zeroshot', '--backbone', str(env['tiny']), '--pretrained', 'none', '--device', 'cpu', '--workers', '0',
            '--output', str(tmp_path)]
    code, _, err = quiet(args + ['--shard', '0/2'])
    assert code == 0, err
    assert len(list(tmp_path.rglob('result.json'))) == 2
    code, _, err = quiet(args[:-2] + ['--output', str(tmp_path / 'x'), '--methods', 'sgd'])
    assert code == 1 and 'unknown --method' in err and not (tmp_path / 'x').exists()


def test_results_table(tmp_path):
    runs = write_fake_runs(tmp_path / 'runs', datasets=('dtd', 'eurosat'), shots=(1, 4), seeds=(1, 2, 3))
    code, out, err = quiet(['results', '--runs', str(runs), '--out', str(tmp_path / 'res')])
    assert code == 0, err
    files = {p.name for p in (tmp_path / 'res').iterdir()}
    assert {'table.md', 'table.csv', 'summary.csv', 'runs.csv', 'figure.png'} <= files
    df = collect(runs)
    want = df[(df.dataset == 'dtd') & (df.shots == 4) & (df.base == 'so')].top1
    md = (tmp_path / 'res' / 'table.md').read_text()
    assert f'{want.mean():.1f} ± {want.std():.1f}' in md
    import pandas as pd
    t = pd.read_csv(tmp_path / 'res' / 'table.csv', dtype=str, keep_default_na=False)
    paper = t[(t.source == 'paper') & (t.method == 'so')].iloc[0]
    assert paper['DTD'] == str(PAPER_4SHOT['so']['dtd']) and paper['Average'] == '78.9'
    assert set(t[t.source == 'CLIP-LoRA paper'].Average) == {'72.5', '75.4', '77.4', '80.3', '83.0'}
    mine = t[(t.source == 'this run') & (t.shots == '4') & (t.method == 'so_d5e-05_T5')].iloc[0]
    per_seed = df[(df.shots == 4) & (df.base == 'so')].groupby('seed').top1.mean()
    assert mine['Average'] == f'{per_seed.mean():.1f} ± {per_seed.std():.1f}' and mine['n_datasets'] == '2'
    s = pd.read_csv(tmp_path / 'res' / 'summary.csv')
    assert len(s) == 2 * 2 * 2 and (s.n_seeds == 3).all()


# --- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize('change, message', [
    (dict(method='sgd'), 'unknown --method'),
    (dict(dataset='mnist'), 'unknown --dataset'),
    (dict(position='middle'), 'unknown --position'),
    (dict(encoder='audio'), 'unknown --encoder'),
    (dict(preset='huge'), 'unknown --preset'),
    (dict(backbone='ViT-X-99'), 'neither an open_clip model name'),
    (dict(backbone='nowhere/tiny.json'), 'no such model-config JSON'),
    (dict(pretrained='laion9000'), "--pretrained laion9000: with a config JSON"),
    (dict(density_ratio='2'), '--density-ratio must be in'),
    (dict(autocast='fp8'), '--autocast must be'),
])
def test_bad_input(env, change, message):
    change = dict(change)
    a = argv_for(env, change.pop('method', 'so'), dataset=change.pop('dataset', 'dtd'), out=env['tmp'] / 'bad')
    for k, v in change.items():
        flag = f"--{k.replace('_', '-')}"
        if flag in a: a[a.index(flag) + 1] = v
        else: a += [flag, v]
    code, _, err = quiet(a)
    assert code == 1 and message in err, err


def test_bad_input_data_and_checkpoint(env, tmp_path):
    code, _, err = quiet(argv_for(env, 'so', out=tmp_path) + ['--eval-only'])
    assert code == 1 and 'no checkpoint at' in err
    a = argv_for(env, 'so', out=tmp_path); a[a.index('--root') + 1] = str(tmp_path / 'no-data')
    code, _, err = quiet(a)
    assert code == 1 and 'no-data' in err
    if not torch.cuda.is_available():
        code, _, err = quiet(argv_for(env, 'so', out=tmp_path, device='cuda'))
        assert code == 1 and 'CUDA is not available' in err


def test_autocast_bf16_and_text_only(env, tmp_path):
    "The optional autocast path and a single trained tower run end to end; the frozen tower stays untouched."
    c = cfg_for(env, 'so', autocast='bf16', encoder='text', n_iters=2)
    with contextlib.redirect_stderr(io.StringIO()): r = clip.run(c, tmp_path)
    assert r['steps'] == 4 and r['config']['autocast'] == 'bf16' and clip.run_name(c).endswith('_enc-text_ac-bf16')
    ck = torch.load(tmp_path / 'delta.pt', weights_only=True)
    assert ck['tensors'] and all(n.startswith('transformer.') for n in ck['tensors'])


# --- sparse backward (issue 6) ---------------------------------------------------------------------

def test_sparse_backward_flag(env, tmp_path):
    code, _, err = quiet(argv_for(env, 'so', out=tmp_path) + ['--sparse-backward'])
    assert code == 0, err
    sb, dense = cfg_for(env, 'so', sparse_backward=True).run_id(), cfg_for(env, 'so').run_id()
    assert '_sb_' in sb and sb.replace('_sb', '') == dense  # never the folder of a dense-gradient run
    r = json.loads((tmp_path / sb / 'result.json').read_text())
    assert r['status'] == 'ok' and r['sparse_backward'] is True and r['config']['sparse_backward'] is True and r['steps'] == 10
    assert r['checkpoint']['changed_entries'] > 0  # the sparse gradients reached SO: weights moved
    for method in ('lora', 'adam'):
        code, _, err = quiet(argv_for(env, method, out=tmp_path) + ['--sparse-backward'])
        assert code == 1 and '--sparse-backward' in err and 'needs --method so' in err
    code, _, err = quiet(argv_for(env, 'so', out=tmp_path, autocast='fp16') + ['--sparse-backward'])
    assert code == 1 and 'gradient scaler' in err


# --- QuickGELU for OpenAI-format weights -------------------------------------------------------------

@pytest.fixture(scope='module')
def openai_files(env):
    "A tiny CLIP with QuickGELU saved as OpenAI saves its weights (a TorchScript archive; a state dict with its extra entries), and plainly."
    import open_clip
    d = env['tmp'] / 'openai'; d.mkdir()
    torch.manual_seed(1)
    m = open_clip.CLIP(**json.loads(env['tiny'].read_text()), quick_gelu=True).eval()
    torch.jit.save(torch.jit.script(m), d / 'ViT-tiny.pt')
    torch.save({**m.state_dict(), 'input_resolution': torch.tensor(32), 'context_length': torch.tensor(16), 'vocab_size': torch.tensor(49408)},
               d / 'openai_sd.pt')
    torch.save(m.state_dict(), d / 'plain.pt')
    return m, d


@pytest.mark.parametrize('name, fmt, act', [('ViT-tiny.pt', 'openai-jit', 'QuickGELU'), ('openai_sd.pt', 'openai', 'QuickGELU'),
                                            ('plain.pt', 'state-dict', 'GELU')])
def test_openai_format_files_get_quickgelu(env, openai_files, name, fmt, act):
    ref, d = openai_files
    assert clip.checkpoint_format(d / name) == fmt
    model, _ = clip.load_clip(env['tiny'], d / name)
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad(): same = torch.allclose(model.encode_image(img), ref.encode_image(img), atol=1e-6)
    assert clip.activation(model) == act and same == (act == 'QuickGELU')  # the same weights through GELU compute something else


def test_named_backbone_with_an_openai_file_gets_quickgelu(openai_files):
    _, d = openai_files
    spec = clip.resolve_backbone('ViT-B-16', d / 'ViT-tiny.pt')  # decided from the file, without building ViT-B/16
    assert spec['quick_gelu'] is True and spec['format'] == 'openai-jit'
    assert clip.resolve_backbone('ViT-B-16', d / 'plain.pt')['quick_gelu'] is False


def test_result_records_activation_and_weights_hash(env, openai_files, tmp_path):
    import hashlib
    _, d = openai_files
    for name, act in (('ViT-tiny.pt', 'QuickGELU'), ('plain.pt', 'GELU')):
        code, _, err = quiet(argv_for(env, 'zeroshot', out=tmp_path) + ['--pretrained', str(d / name)])
        assert code == 0, err
        (p,) = [p for p in tmp_path.rglob('result.json') if name.split('.')[0] in str(p)]
        r = json.loads(p.read_text())
        assert r['activation'] == act and r['pretrained_sha256'] == hashlib.sha256((d / name).read_bytes()).hexdigest()
        assert r['backbone_sha256'] == hashlib.sha256(env['tiny'].read_bytes()).hexdigest()
        assert r['identity']['pretrained'] == 'sha256:' + r['pretrained_sha256']
