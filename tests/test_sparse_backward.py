"The sparse-gradient backward gives the dense-gradient path's parameters, on tiny CLIP and BERT."
import copy, pytest, torch
import torch.nn.functional as F
from torch import nn
from so_tutorial.optim import SO
from so_tutorial.sparse import SparseBackward, clip_grad_norm_, _SparseLinearFn


def tiny_clip(seed=0):
    import open_clip
    torch.manual_seed(seed)
    return open_clip.CLIP(embed_dim=16, quick_gelu=True,
                          vision_cfg=dict(image_size=16, layers=2, width=32, patch_size=8, head_width=16),
                          text_cfg=dict(context_length=8, vocab_size=50, width=32, heads=2, layers=2))


def clip_sparse_params(model):
    names = ('attn.in_proj_weight', 'attn.out_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
    return [p for n, p in model.named_parameters() if n.endswith(names)]


def clip_loss(model, imgs, toks, labels):
    i = F.normalize(model.encode_image(imgs), dim=-1)
    t = F.normalize(model.encode_text(toks), dim=-1)
    return F.cross_entropy(100 * i @ t.T, labels)


def train_clip(sparse_backward, steps=12, autocast=None, micro=1, seed=0):
    model = tiny_clip(seed)
    for p in model.parameters(): p.requires_grad_(False)
    ps = clip_sparse_params(model)
    for p in ps: p.requires_grad_(True)
    opt = SO(ps, lr=1e-3, density_ratio=0.05, T=3, generator=torch.Generator().manual_seed(1))
    if sparse_backward: SparseBackward(model, opt)
    g = torch.Generator().manual_seed(2)
    toks = torch.randint(1, 50, (3, 8), generator=g)
    for _ in range(steps):
        imgs, labels = torch.randn(6, 3, 16, 16, generator=g), torch.randint(0, 3, (6,), generator=g)
        for j in range(micro):
            sl = slice(j * 6 // micro, (j + 1) * 6 // micro)
            with torch.autocast('cpu', dtype=autocast, enabled=autocast is not None):
                loss = clip_loss(model, imgs[sl], toks, labels[sl]) / micro
            loss.backward()
        opt.step()
    return model, ps


def max_diff(a, b): return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def test_clip_both_towers_match_dense():
    (_, dense), (m, sparse) = train_clip(False), train_clip(True)
    assert max_diff(dense, sparse) < 1e-5
    # every attention and MLP of both towers was switched to the sparse backward
    n_mha = sum(isinstance(x, nn.MultiheadAttention) for x in m.modules())
    assert n_mha == 4 and all(hasattr(x, '_so_sb') for x in m.modules() if isinstance(x, nn.MultiheadAttention))
    # and the weights really moved
    assert max_diff(dense, clip_sparse_params(tiny_clip())) > 1e-4


def test_clip_autocast_bf16_gradients_match_dense():
    # Under bf16 autocast the dense path rounds each weight-gradient entry to bf16, so trajectories drift
    # apart through Adam's sign-like first steps; compare the gradients themselves instead.
    model = tiny_clip(); ps = clip_sparse_params(model)
    toks, imgs, labels = torch.randint(1, 50, (3, 8)), torch.randn(6, 3, 16, 16), torch.randint(0, 3, (6,))
    with torch.autocast('cpu', dtype=torch.bfloat16): clip_loss(model, imgs, toks, labels).backward()
    dense = [p.grad.clone() for p in ps]
    for p in ps: p.grad = None
    opt = SO(ps, density_ratio=0.05); SparseBackward(model, opt)
    with torch.autocast('cpu', dtype=torch.bfloat16): clip_loss(model, imgs, toks, labels).backward()
    for p, d in zip(ps, dense):
        S = opt.state[p]['grad_support']
        got, want = opt.sparse_grads[p], d.reshape(-1)[S].float()
        assert (got - want).abs().max() <= 2e-2 * d.abs().max() + 1e-6


def test_gradient_accumulation_over_micro_batches():
    (_, one), (_, two) = train_clip(True, micro=1), train_clip(True, micro=2)
    (_, dense2) = train_clip(False, micro=2)
    assert max_diff(two, dense2) < 1e-5
    assert max_diff(one, two) < 1e-5


def test_sparse_weights_never_get_dense_grad_and_others_do():
    model = tiny_clip()
    ps = clip_sparse_params(model)
    opt = SO(ps, density_ratio=0.05)
    SparseBackward(model, opt)
    toks = torch.randint(1, 50, (3, 8))
    clip_loss(model, torch.randn(4, 3, 16, 16), toks, torch.randint(0, 3, (4,))).backward()
    assert all(p.grad is None for p in ps)
    assert set(opt.sparse_grads) == set(ps)
    assert all(v.numel() == int(p.numel() * 0.05) for p, v in opt.sparse_grads.items())
    others = [p for p in model.parameters() if all(p is not q for q in ps) and p.requires_grad]
    assert others and all(p.grad is not None for p in others if p.grad is not None) and any(p.grad is not None for p in others)
    with pytest.raises(ValueError, match='not supported'): clip_grad_norm_(model.parameters(), 1.0, opt)


def test_no_grad_forward_draws_nothing():
    model = tiny_clip(); ps = clip_sparse_params(model)
    gen = torch.Generator().manual_seed(0)
    opt = SO(ps, density_ratio=0.05, generator=gen)
    SparseBackward(model, opt)
    state = gen.get_state()
    with torch.no_grad(): model.encode_image(torch.randn(2, 3, 16, 16))
    assert torch.equal(gen.get_state(), state) and not opt.state


def test_saves_only_the_touched_input_columns():
    lin = nn.Linear(64, 64)
    opt = SO([lin.weight], density_ratio=0.01)  # k = 40 entries
    def saved_bytes(fn):
        total = []
        pack = lambda t: (total.append(t.numel() * t.element_size()), t)[1]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t): fn()
        return sum(total)
    x = torch.randn(32, 64, requires_grad=False)
    dense = saved_bytes(lambda: lin(x))
    sb = SparseBackward(lin, opt)
    sparse = saved_bytes(lambda: lin(x))
    # the dense layer keeps its whole input; the sparse one keeps 40 input columns and 40 row indices
    assert sparse - lin.weight.numel() * 4 < dense / 1.5
    sb.remove()
    assert 'forward' not in vars(lin)


def test_bert_matches_dense():
    from transformers import BertConfig, BertForSequenceClassification
    def run(sparse_backward, steps=10):
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=32, num_labels=2)
        model = BertForSequenceClassification(cfg)
        sparse = [p for n, p in model.named_parameters() if p.ndim >= 2 and 'pooler' not in n and 'classifier' not in n]
        dense = [p for p in model.parameters() if all(p is not q for q in sparse)]
        opt = SO([dict(params=sparse), dict(params=dense, dense=True)], lr=1e-3, density_ratio=0.05, T=4,
                 generator=torch.Generator().manual_seed(1))
        if sparse_backward: SparseBackward(model, opt)
        g = torch.Generator().manual_seed(3)
        torch.manual_seed(5)  # dropout masks: the same stream in both runs
        for _ in range(steps):
            ids, y = torch.randint(0, 60, (4, 12), generator=g), torch.randint(0, 2, (4,), generator=g)
            model(input_ids=ids, labels=y).loss.backward()
            opt.step()
        return list(model.parameters())
    assert max_diff(run(False), run(True)) < 1e-5


def test_zero_grad_discards_pending_sparse_values():
    lin = nn.Linear(8, 8)
    opt = SO([lin.weight], density_ratio=0.25); SparseBackward(lin, opt)
    lin(torch.randn(3, 8)).sum().backward()
    assert lin.weight in opt.sparse_grads
    w0 = lin.weight.detach().clone()
    opt.zero_grad(); opt.step()
    assert not opt.sparse_grads and torch.equal(lin.weight, w0)


def test_modules_use_only_sos_public_methods():
    "Outside so_tutorial/optim.py no module reads or writes SO's private state (opt._...)."
    import re, pathlib, so_tutorial
    root = pathlib.Path(so_tutorial.__file__).parent
    offenders = {f.name: hits for f in root.glob('*.py') if f.name not in ('optim.py', '_modidx.py')
                 for hits in [re.findall(r'\bopt\._\w+|\._sparse_grads\b|\._prepared\b|prepare_supports', f.read_text())] if hits}
    assert not offenders, offenders
