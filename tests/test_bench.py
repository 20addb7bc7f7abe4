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
