"BERT GLUE-RTE 32-shot pipeline (so_tutorial.bert) on a tiny BERT and generated RTE-format data, offline."
import json, re, warnings
from dataclasses import replace
from collections import Counter
from pathlib import Path

import pandas as pd, pytest, torch

transformers = pytest.importorskip('transformers')
datasets = pytest.importorskip('datasets')
pytest.importorskip('peft')

from so_tutorial import bert
from so_tutorial.cli import main
from so_tutorial.io import UserError
from so_tutorial.engine import train

transformers.logging.set_verbosity_error(); transformers.logging.disable_progress_bar(); datasets.disable_progress_bars()
pytestmark = pytest.mark.filterwarnings('ignore::UserWarning', 'ignore::FutureWarning', 'ignore::DeprecationWarning')


@pytest.fixture(scope='module')
def fx(tmp_path_factory):
    "A tiny BERT with its tokenizer, and the same generated RTE data as JSON Lines and as CSV."
    d = tmp_path_factory.mktemp('bert')
    return dict(model=str(bert.save_tiny_bert(d / 'tiny-bert')), jsonl=str(bert.write_toy_rte(d / 'rte_jsonl')),
                csv=str(bert.write_toy_rte(d / 'rte_csv', fmt='csv')), root=d)


def _cli(fx, *args, data='jsonl'):
    return ['bert', '--model', fx['model'], '--data', fx[data], '--max-length', '32', '--device', 'cpu', *args]


def _sweep(fx, *args):
    return ['sweep', 'bert', '--model', fx['model'], '--data', fx['jsonl'], '--max-length', '32', '--device', 'cpu', *args]


def test_so_run_through_cli(fx, tmp_path, capsys):
    out = tmp_path / 'so'
    assert main(_cli(fx, '--method', 'so', '--kappa', '1e-2', '--T', '2', '--loss-stop', '0', '--max-steps', '6', '--output', str(out))) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / 'result.json').read_text())
    line = next(l for l in printed.splitlines() if l.startswith('SO – '))
    assert line.startswith('SO – tiny-bert RTE-32shot: ') and 'legacy bias correction' in line
    assert float(re.search(r':\s*([0-9.]+)%', line).group(1)) == round(res['val_acc'], 1)  # what the paper's grid script parses
    assert 'Hit --max-steps 6' in printed
    assert res['status'] == 'ok' and res['method'] == 'so' and res['steps'] == 6 and res['stop_reason'] == 'max_steps'
    c = res['config']
    assert (c['density_ratio'], c['T'], c['legacy_dense_bias'], c['seed'], c['device']) == (0.01, 2, True, 42, 'cpu')
    assert c['model'] == fx['model'] and c['data'] == fx['jsonl'] and 'rank' not in c
    assert 'legacy' in res['dense_group'] and res['val_total'] == 40 and res['train_size'] == 32
    assert 0 <= res['val_acc'] <= 100 and res['val_correct'] == round(res['val_acc'] * 40 / 100)
    assert res['peak_memory_bytes'] > 0 and res['wall_s'] > 0 and res['machine']['device'] == 'cpu'
    assert res['versions']['transformers'] and res['versions']['peft'] and res['versions']['datasets'] and res['versions']['so_tutorial']
    assert res['sparse_k_total'] > 0 and res['trainable_params'] > res['sparse_k_total']
    assert len((out / 'train_loss.csv').read_text().splitlines()) == 1 + 6


def test_lora_run_through_cli_on_csv(fx, tmp_path, capsys):
    out = tmp_path / 'lora'
    assert main(_cli(fx, '--method', 'lora', '--rank', '2', '--max-steps', '4', '--output', str(out), data='csv')) == 0
    assert re.search(r'^LoRA – tiny-bert RTE-32shot: [0-9.]+%', capsys.readouterr().out, re.M)
    res = json.loads((out / 'result.json').read_text())
    assert res['method'] == 'lora' and res['config']['rank'] == 2 and 'density_ratio' not in res['config'] and res['steps'] == 4
    assert res['config']['data'] == fx['csv'] and res['val_total'] == 40


def test_stop_rule(fx, tmp_path, capsys):
    out = tmp_path / 'stop'
    assert main(_cli(fx, '--method', 'so', '--kappa', '1e-2', '--loss-stop', '10', '--output', str(out))) == 0
    assert 'Stopped at step 1 with loss' in capsys.readouterr().out
    res = json.loads((out / 'result.json').read_text())
    assert (res['steps'], res['stop_reason']) == (1, 'loss_stop') and res['final_loss'] <= 10


def test_default_output_folder_names_the_run(fx, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(_cli(fx, '--method', 'so', '--kappa', '1e-2', '--no-legacy-dense-bias', '--max-steps', '1')) == 0
    res_file = tmp_path / 'runs/bert/tiny-bert/rte_jsonl-32shot/seed42/so_k1e-02_T5_adam_max1_len32/result.json'
    res = json.loads(res_file.read_text())
    assert res['config']['legacy_dense_bias'] is False and res['dense_group'] == 'correct Adam' and 'correct Adam' in res['line']


def test_legacy_switch_changes_only_the_dense_group_step(fx):
    "The legacy dense-group update bias-corrects the first moment twice: its first step is 1/(1-β1) = 10× larger; sparse tensors are unaffected."
    moved = {}
    for legacy in (True, False):
        cfg = bert.BertRunConfig(method='so', model=fx['model'], data=fx['jsonl'], max_length=32, density_ratio=1e-2, device='cpu',
                                 legacy_dense_bias=legacy).resolved()
        r = bert.prepare(cfg)
        before = {n: p.detach().clone() for n, p in r['model'].named_parameters()}
        bert.seed_everything(42); train(r['training'], 1, stop_batch_loss=0, progress=False)
        moved[legacy] = {n: (p.detach() - before[n]).abs().max().item() for n, p in r['model'].named_parameters()}
    clf = 'classifier.weight'
    assert moved[True][clf] == pytest.approx(10 * moved[False][clf], rel=1e-2)
    emb = 'bert.embeddings.word_embeddings.weight'
    assert moved[True][emb] == moved[False][emb] > 0


def test_rerun_is_skipped_force_reruns_other_config_refused(fx, tmp_path, capsys):
    out = tmp_path / 'r'
    argv = _cli(fx, '--method', 'lora', '--rank', '2', '--max-steps', '2', '--output', str(out))
    assert main(argv) == 0
    first = (out / 'result.json').read_text()
    capsys.readouterr()
    assert main(argv) == 0
    assert 'finished already' in capsys.readouterr().out and (out / 'result.json').read_text() == first
    assert main(argv + ['--force']) == 0
    assert json.loads((out / 'result.json').read_text())['wall_s'] != json.loads(first)['wall_s']
    capsys.readouterr()
    assert main(_cli(fx, '--method', 'lora', '--rank', '4', '--max-steps', '2', '--output', str(out))) == 1
    assert 'holds the result of another run (--rank is 2 there, 4 here)' in capsys.readouterr().err


def test_so_grid_records_failures_and_resumes(fx, tmp_path, monkeypatch, capsys):
    root = tmp_path / 'grid'
    argv = _sweep(fx, '--method', 'so', '--kappas', '1e-2', '1e-3', '--Ts', '2', '--max-steps', '3', '--output', str(root))
    real = bert.run_bert
    def flaky(cfg, out_dir=None, progress=True):
        if cfg.density_ratio == 1e-3: raise RuntimeError('boom')
        return real(cfg, out_dir, progress=False)
    monkeypatch.setattr(bert, 'run_bert', flaky)
    assert main(argv) == 1  # a job failed in this process
    df = pd.read_csv(root / 'so_grid_results.csv')
    assert list(df.columns[:4]) == ['kappa', 'T', 'steps', 'val_acc'] and list(df.kappa) == [1e-2, 1e-3]
    assert list(df.status) == ['ok', 'failed'] and 'RuntimeError: boom' in df.error[1] and df.steps[0] == 3
    ok_file = root / 'seed42/so_k1e-02_T2_q2legacy_max3_len32/result.json'
    ok_text = ok_file.read_text()
    monkeypatch.setattr(bert, 'run_bert', real)
    assert main(argv) == 0
    df = pd.read_csv(root / 'so_grid_results.csv')
    assert list(df.status) == ['ok', 'ok'] and ok_file.read_text() == ok_text  # the failed run reran, the finished one was skipped
    assert df.val_acc.between(0, 100).all() and bool(df.legacy_dense_bias.all())


def test_lora_grid_with_seeds_and_shards(fx, tmp_path, capsys):
    root = tmp_path / 'lgrid'
    argv = _sweep(fx, '--method', 'lora', '--ranks', '2', '4', '--seeds', '1', '2', '--max-steps', '2', '--output', str(root))
    assert main(argv + ['--shard', '0/2']) == 0  # jobs in order (r2,s1) (r2,s2) (r4,s1) (r4,s2): shard 0 runs every other one
    df = pd.read_csv(root / 'lora_grid_results.csv')
    assert list(df['rank']) == [2, 4] and list(df.status) == ['partial', 'partial'] and list(df.n_ok) == [1, 1]
    assert main(argv) == 0
    df = pd.read_csv(root / 'lora_grid_results.csv')
    assert list(df.columns[:3]) == ['rank', 'steps', 'val_acc'] and {'steps_std', 'val_acc_std', 'val_acc_per_seed'} <= set(df.columns)
    assert list(df.status) == ['ok', 'ok'] and list(df.n_ok) == [2, 2] and list(df.seeds) == ['1 2', '1 2']
    accs = [json.loads((root / f'seed{s}/lora_r2_max2_len32/result.json').read_text())['val_acc'] for s in (1, 2)]
    assert df.val_acc[0] == pytest.approx(sum(accs) / 2, abs=0.01)
    assert df.val_acc_std[0] == pytest.approx(pd.Series(accs).std(), abs=0.01)


def test_trainer_gives_the_same_run(fx):
    cfg = bert.BertRunConfig(method='so', model=fx['model'], data=fx['jsonl'], max_length=32, density_ratio=1e-2, T=3, device='cpu').resolved()
    def loop(r):
        st = train(r['training'], 10, stop_batch_loss=0.0, progress=False)
        return st['step'], st['losses'], st['reason']
    runs = []
    for driver in (loop, lambda r: bert.train_with_trainer(r['model'], r['opt'], r['sched'], r['train_dl'], 0.0, 10, seed=42, progress=False)):
        r = bert.prepare(cfg); bert.seed_everything(42)
        runs.append((driver(r), r['model'].state_dict()))
    (loop, w1), (trainer, w2) = runs
    assert loop == trainer and loop[0] == 10 and loop[2] == 'max_steps'  # 10 steps cross two epoch boundaries (4 batches each)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    res = bert.run_bert(replace(cfg, driver='trainer', loss_stop=10.0), progress=False)
    assert (res['steps'], res['stop_reason'], res['config']['driver']) == (1, 'loss_stop', 'trainer')


@pytest.mark.parametrize('files, message', [
    ({'train.csv': 'premise,hypothesis,label\na,b,0\n', 'validation.csv': 'sentence1,sentence2,label\na,b,0\n'},
     'missing column(s) sentence1, sentence2'),
    ({'train.jsonl': '{"sentence1": "a", "sentence2": "b", "label": 2}\n', 'validation.jsonl': '{"sentence1": "a", "sentence2": "b", "label": 0}\n'},
     'label must be 0 (entailment) or 1 (not entailment); found 2 in row 0'),
    ({'train.csv': 'sentence1,sentence2,label\na,b,0\n'}, 'no validation file'),
    ({'validation.csv': 'sentence1,sentence2,label\na,b,0\n'}, 'no train file'),
])
def test_bad_data_is_a_clear_error(fx, tmp_path, capsys, files, message):
    for name, text in files.items(): (tmp_path / name).write_text(text)
    assert main(['bert', '--method', 'so', '--model', fx['model'], '--data', str(tmp_path), '--device', 'cpu', '--output', str(tmp_path / 'o')]) == 1
    err = capsys.readouterr().err
    assert message in err and 'Traceback' not in err and not (tmp_path / 'o/result.json').exists()


def test_bad_model_is_a_clear_error(fx, tmp_path, capsys):
    assert main(_cli(fx, '--method', 'so') + ['--model', str(tmp_path / 'no-such-model')]) == 1
    assert 'no such folder' in capsys.readouterr().err
    (tmp_path / 'empty').mkdir()
    assert main(_cli(fx, '--method', 'so') + ['--model', str(tmp_path / 'empty')]) == 1
    assert 'no config.json' in capsys.readouterr().err
    with pytest.raises(UserError, match='--kappa must be in'): bert.BertRunConfig(method='so', density_ratio=0.0, device='cpu').resolved()


def test_few_shot_draws(fx):
    train = bert.load_rte_splits(fx['jsonl'])['train']
    paper = bert.few_shot(train, 32, 42)
    assert list(paper['sentence1']) == list(train.shuffle(seed=42).select(range(32))['sentence1'])
    bal = bert.few_shot(train, 32, 42, balanced=True)
    assert Counter(bal['label']) == {0: 16, 1: 16}
    order = list(train.shuffle(seed=42)['sentence1'])
    pos = [order.index(s) for s in bal['sentence1']]
    assert pos == sorted(pos)  # same shuffled order as the paper's draw
    for c in (0, 1): assert [s for s, l in zip(order, train.shuffle(seed=42)['label']) if l == c][:16] == [s for s, l in zip(bal['sentence1'], bal['label']) if l == c]
    skewed = datasets.Dataset.from_dict(dict(sentence1=['a'] * 13, sentence2=['b'] * 13, label=[0] * 10 + [1] * 3))
    with pytest.raises(UserError, match='needs 4 examples of each label'): bert.few_shot(skewed, 8, 42, balanced=True)
    with pytest.raises(UserError, match='fewer than --shots 80'): bert.few_shot(train, 80, 42)


def test_sparse_dense_split_and_lora_targets_on_bert_base_shapes():
    from transformers import BertConfig, BertForSequenceClassification
    with torch.device('meta'): m = BertForSequenceClassification(BertConfig(num_labels=2))
    dense = {n for n, p in m.named_parameters() if bert.is_dense(n, p)}
    assert 'bert.embeddings.word_embeddings.weight' not in dense and 'bert.encoder.layer.3.attention.self.query.weight' not in dense
    assert {'bert.pooler.dense.weight', 'classifier.weight', 'bert.embeddings.LayerNorm.weight', 'bert.encoder.layer.0.output.dense.bias'} <= dense
    kt = bert.sparse_k_table(m)
    assert kt.loc[kt.tensor == 'bert.embeddings.word_embeddings.weight', 'k at κ=0.01'].item() == 234_408
    with torch.device('meta'): lo = bert.lora_model(BertForSequenceClassification(BertConfig(num_labels=2)), rank=4)
    assert bert.lora_kinds(lo) == {k: 12 for k in ('attention.self.query', 'attention.self.key', 'attention.self.value',
                                                   'attention.output.dense', 'intermediate.dense', 'output.dense')}
    grads = {n: p.requires_grad for n, p in lo.named_parameters()}
    assert all(v for n, v in grads.items() if 'lora_' in n or 'modules_to_save' in n)
    assert not any(v for n, v in grads.items() if 'original_module' in n)
    assert all(v for n, v in grads.items() if n.endswith(('LayerNorm.weight', '.bias')) and 'original_module' not in n)
    assert not grads['base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.weight']


def test_tiny_tokenizer_knows_its_words(fx):
    tok, _ = bert.load_model(fx['model'])
    ids = tok('the cat sits', 'a dog')['input_ids']
    assert tok.unk_token_id not in ids and len(ids) == 8


def test_sparse_backward_flag(fx, tmp_path, capsys):
    out = tmp_path / 'sb'
    args = ('--method', 'so', '--kappa', '1e-2', '--loss-stop', '0', '--max-steps', '4')
    assert main(_cli(fx, *args, '--sparse-backward', '--output', str(out))) == 0
    res = json.loads((out / 'result.json').read_text())
    assert res['config']['sparse_backward'] is True and res['steps'] == 4 and res['status'] == 'ok'
    cfg = bert.BertRunConfig(method='so', density_ratio=1e-2, sparse_backward=True, device='cpu').resolved()
    assert bert.arm_id(cfg).endswith('_sb') and bert.arm_id(cfg) != bert.arm_id(replace(cfg, sparse_backward=False))
    # the sparse backward really ran: its weights differ in the last bits from the dense-gradient run's
    assert main(_cli(fx, *args, '--output', str(tmp_path / 'dense'))) == 0
    dense = json.loads((tmp_path / 'dense' / 'result.json').read_text())
    assert dense['config']['sparse_backward'] is False and dense['trained_sha1'] != res['trained_sha1']
    capsys.readouterr()
    assert main(_cli(fx, '--method', 'lora', '--sparse-backward', '--output', str(tmp_path / 'lora'))) == 1
    assert 'needs --method so' in capsys.readouterr().err
