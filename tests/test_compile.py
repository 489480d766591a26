"""torch.compile(a) of an apollo model: one schedule, every depth, few graphs (regional compilation).

The stack's per-position step is opaque to dynamo, so the model's block loop runs eagerly and each block call is
compiled as its own frame; the depth and sharing never enter a graph. Losses are compared with a tolerance: a
compiled backward may sum a shared block's gradients in another order (and, under autocast, in fp32 where eager
sums them in bf16).
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import growops
from tests.models import IndexLoopNet, gpt_batch, tiny_gpt


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()


def _schedule(model, shared_linear=False):
    # 4 stages with 4 steps each and a uniform sampler: more than 8 (unique, depth) pairs and 3 growths.
    return growops.apollo(model, stages=(1, 2, 3, 6), stage_steps=(4, 8, 12), sampler="uniform", seed=1,
                          shared_linear=shared_linear)


def _train_both(make, loss_fn, backend, steps=16, shared_linear=False):
    """Train an eager and a compiled copy side by side; returns (eager losses, compiled losses, configs seen)."""
    eager, compiled = _schedule(make(), shared_linear), _schedule(make(), shared_linear)
    run = torch.compile(compiled, backend=backend)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (eager, compiled)]
    losses, seen, growths = ([], []), set(), 0
    for _ in range(steps):
        assert (eager.unique_layers, eager.depth) == (compiled.unique_layers, compiled.depth)
        seen.add((eager.unique_layers, eager.depth))
        for i, (model, fn, opt) in enumerate(zip((eager, compiled), (eager, run), opts)):
            loss = loss_fn(fn)
            loss.backward()
            opt.step()
            opt.zero_grad()
            stage = model.stage
            model.step(opt)
            growths += i == 0 and model.stage != stage
            losses[i].append(loss.item())
    return losses, seen, growths


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_example_gpt_whole_schedule_few_graphs(backend):
    batch = gpt_batch()
    (eager, compiled), seen, growths = _train_both(lambda: tiny_gpt(6), lambda m: m(**batch).loss, backend)
    assert len(seen) >= 8 and growths >= 2
    assert 1 <= counters["stats"]["unique_graphs"] <= 6  # something compiled, and few graphs
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_routed_linears_compile_with_few_graphs():
    """growops::shared_linear (its fake and autograd registrations) inside inductor-compiled blocks."""
    batch = gpt_batch()
    (eager, compiled), seen, growths = _train_both(lambda: tiny_gpt(6), lambda m: m(**batch).loss, "inductor",
                                                   shared_linear=True)
    assert len(seen) >= 8 and growths >= 2
    assert 1 <= counters["stats"]["unique_graphs"] <= 6  # something compiled, and few graphs
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_graph_mode_model_whole_schedule_few_graphs():
    x = torch.randn(3, 4)

    def make():
        torch.manual_seed(0)
        return IndexLoopNet(6)

    (eager, compiled), seen, growths = _train_both(make, lambda m: m(x).square().mean(), "aot_eager")
    assert len(seen) >= 8 and growths >= 2
    assert 1 <= counters["stats"]["unique_graphs"] <= 6  # something compiled, and few graphs
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_hf_gpt2_whole_schedule_few_graphs():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(n_layer=6, n_embd=32, n_head=2, vocab_size=96, n_positions=32, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout: eager and compiled draw differently

    def make():
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(config)

    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    # use_cache=False as in training: a KV cache read per layer would specialise each block graph on layer_idx
    (eager, compiled), seen, growths = _train_both(make, lambda m: m(input_ids=ids, labels=ids, use_cache=False).loss,
                                                   "aot_eager")
    assert len(seen) >= 8 and growths >= 2
    assert 1 <= counters["stats"]["unique_graphs"] <= 6  # something compiled, and few graphs
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_eval_after_training_adds_at_most_a_graph_per_mode():
    batch = gpt_batch()
    a = _schedule(tiny_gpt(6))
    run = torch.compile(a, backend="aot_eager")
    for _ in range(6):
        run(**batch).loss.backward()
        a.step()
    a.eval()
    with torch.no_grad():
        compiled = run(**batch).loss
        assert torch.allclose(compiled, a(**batch).loss, rtol=1e-5)
    assert 1 <= counters["stats"]["unique_graphs"] <= 4
