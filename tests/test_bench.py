"The benchmarks measure what they say: state sizes, gradient bytes per arm, and files that name the machine."
import json
import pytest
from so_tutorial.bench import bench_optimizer, write_bench
from so_tutorial.benchtrain import measure_arm, train_markdown, train_figure
from so_tutorial.cli import main


def test_optimizer_bench_state_is_order_k(tmp_path):
    res = bench_optimizer(shapes=[(200, 100), (100, 200)], densities=(0.01, 0.1), samplers=('fast',), T=2, periods=1, adamw_steps=1)
    adamw, *so = res['rows']
    assert adamw['state_bytes'] == 2 * (2 * 20_000 * 4 + 4)  # two fp32 moments per weight, and a step count
    # SO: per tensor k int64 moment indices, k int64 support indices, 2k fp32 moments and an int64 step count
    for r in so: assert r['state_bytes'] == 2 * (int(20_000 * r['density']) * (8 + 8 + 4 + 4) + 8)
    j, md = write_bench(res, tmp_path)
    assert json.loads(j.read_text())['machine']['device'] == 'cpu' and 'AdamW' in md.read_text()


@pytest.mark.parametrize('arm', ['so', 'so_sparse'])
def test_bert_arm_memory_split(arm):
    r = measure_arm('bert', arm, batch=1, steps=1, warmup=1)
    assert r['trainable_params'] > 100_000_000 and r['state_bytes'] < 20e6  # O(k) optimizer state
    dense_grads = 109_483_778 * 4
    if arm == 'so': assert r['grad_bytes'] == dense_grads
    else: assert r['grad_bytes'] < dense_grads / 4  # only the word embedding keeps a dense gradient


def test_train_report_files(tmp_path):
    rows = [dict(model='clip', arm=a, batch=4, step_ms=t, peak_bytes=m, param_bytes=1, grad_bytes=1, state_bytes=1, trainable_params=10)
            for a, t, m in (('so', 200., 4e9), ('so_sparse', 100., 2e9), ('lora', 100., 3e9))]
    rows.append(dict(model='clip', arm='adam', error=['MemoryError']))
    res = dict(machine=dict(device='cpu', device_name='x86_64', torch_threads=2, torch='2', date='today'), steps=3, warmup=2, n_classes=10, rows=rows)
    md = train_markdown(res)
    assert '| clip | so_sparse | 4 | 100 | 1.00 | 1,907 | 0.50 | 0.67 |' in md and 'failed' in md
    assert train_figure(res, tmp_path / 't.png').stat().st_size > 1000


def test_bench_train_rejects_missing_gpu(capsys):
    import torch
    if torch.cuda.is_available(): pytest.skip('a GPU is present')
    assert main(['bench', 'train', '--device', 'cuda', '--models', 'bert']) == 1
    assert 'no GPU' in capsys.readouterr().err


PAPER_STAND_IN = '''
import torch
class SO(torch.optim.Optimizer):
    "A stand-in with the paper optimizer's constructor (plain SGD), to test how the benchmark loads and times it."
    def __init__(self, params, lr=1e-3, betas=(0.4, 0.999), eps=1e-8, weight_decay=0, density_ratio=0.1, T=30):
        super().__init__(params, dict(lr=lr))
    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            assert 'dense' in g  # the paper's code needs this key
            for p in g['params']:
                if p.grad is not None: p.add_(p.grad, alpha=-g['lr']); p.grad = None
'''


def test_optimizer_bench_medians_figure_and_paper_code(tmp_path):
    repo = tmp_path / 'paper'; (repo / 'optimizers').mkdir(parents=True)
    (repo / 'optimizers' / 'SparseOptimizer.py').write_text(PAPER_STAND_IN)
    res = bench_optimizer(shapes=[(200, 100), (100, 200)], densities=(0.01, 0.1), samplers=('fast',), T=2, periods=1,
                          rounds=3, adamw_steps=1, paper_code=repo, paper_max_bytes=2 * 1000 ** 2)
    rows = {(r['optimizer'], r['density']): r for r in res['rows']}
    assert rows[('paper', 0.01)]['step_ms'] > 0  # k = 200: timed
    assert 'GiB' in rows[('paper', 0.1)]['skipped']  # k = 2000: its k×k comparison exceeds the limit
    for r in res['rows']:
        if 'step_ms' in r: assert r['step_ms_min'] <= r['step_ms'] <= r['step_ms_max'] and r['ratio_min'] <= r['ratio_to_adamw'] <= r['ratio_max']
    j, md = write_bench(res, tmp_path / 'out')
    assert (tmp_path / 'out' / 'optimizer.png').stat().st_size > 10_000
    text = md.read_text()
    assert 'Medians over 3 rounds' in text and 'skipped' in text and 'vary between machines' in text


def test_optimizer_bench_cli_errors(tmp_path, capsys):
    assert main(['bench', 'optimizer', '--quick', '--paper-code', str(tmp_path), '--out', str(tmp_path)]) == 1
    assert 'SparseOptimizer.py' in capsys.readouterr().err
    assert main(['bench', 'optimizer', '--quick', '--rounds', '0', '--out', str(tmp_path)]) == 1
