"""The last decoder layer at the query positions only (`LastAtQueries`): the layer's own values and
gradients, with LoRA and the dropout hooks; only the last layer, and only where the backbone allows it."""

from __future__ import annotations

import pytest
import torch
from helpers import toy_zoo_with_llama

from st2si_cli.model.layers import (
    LastAtQueries,
    TopST2SI,
    at_queries_fits,
    n_layers,
    run_from,
    states_entering,
)
from st2si_cli.pretrain.tuning import add_dropout, add_lora
from st2si_cli.pretrain.weights import load_trainable

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return toy_zoo_with_llama(tmp_path_factory.mktemp("lastzoo"))


def _queries(batch: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Some query positions per row, not in row order (rows end at different lengths)."""
    g = torch.Generator().manual_seed(seed)
    pos = [(r, c) for r in range(batch) for c in range(width - 2 * r) if torch.rand(1, generator=g) < 0.4]
    pos = [pos[i] for i in torch.randperm(len(pos), generator=g)]
    return torch.tensor([r for r, _ in pos]), torch.tensor([c for _, c in pos])


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("lora", [False, True])
def test_the_last_layer_at_the_queries_only_gives_the_layers_values_and_gradients(zoo, k, lora):
    """TopST2SI with the last layer at the queries only against the layer's own forward: the query
    states and every trainable gradient, with LoRA (random B) and the dropout hooks (eval mode)."""
    torch.manual_seed(0)
    model, _ = load_trainable(zoo, zoo.get("tiny-llama4"), "dot")
    module = TopST2SI(model, 11, n_layers(model) - k, pad_id=0, seed=0)
    if lora:
        add_lora(model, 4, first_layer=n_layers(model) - k)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".lora_B." in n:
                    p.normal_(0, 0.05)
    add_dropout(model, 0.1, first_layer=n_layers(model) - k)
    module.eval()
    assert at_queries_fits(model.layers[-1])
    ids = torch.randint(3, 250, (4, 17))
    rows, cols = _queries(4, 17, seed=k)
    hidden = states_entering(model, ids, n_layers(model) - k).detach()
    targets = torch.randint(0, 11, (rows.numel(),))

    def run(at_queries: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        module.zero_grad()
        module.last_at_queries = at_queries
        states = module.top_states(hidden, ids, rows, cols)
        module(hidden, ids, rows, cols, targets)[1].backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
        return states.detach(), grads

    fast, fast_grads = run(True)
    plain, plain_grads = run(False)
    torch.testing.assert_close(fast, plain, rtol=0, atol=2e-6)
    assert fast_grads.keys() == plain_grads.keys() and fast_grads
    for name, g in fast_grads.items():
        torch.testing.assert_close(g, plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_only_the_last_layer_runs_at_the_queries_and_only_where_it_fits(zoo, monkeypatch):
    """The stand-in replaces the last layer alone (the layers below it see every position), and an
    OPT layer runs whole."""
    seen = []
    real = LastAtQueries.forward
    monkeypatch.setattr(
        LastAtQueries, "forward", lambda self, *a, **kw: seen.append(1) or real(self, *a, **kw)
    )
    llama, _ = load_trainable(zoo, zoo.get("tiny-llama4"), "dot")
    ids = torch.randint(3, 250, (2, 9))
    rows, cols = torch.tensor([0, 1, 1]), torch.tensor([8, 3, 6])
    with torch.no_grad():
        h = states_entering(llama, ids, 1)
        out = run_from(llama, ids, h, 1, (rows, cols))
        torch.testing.assert_close(out[rows, cols], run_from(llama, ids, h, 1)[rows, cols], rtol=0, atol=2e-6)
    assert seen == [1]
    assert len(llama.layers) == 4 and not any(
        isinstance(m, LastAtQueries) for m in llama.modules()
    )  # restored
    opt, _ = load_trainable(zoo, zoo.get("tiny-opt"), "dot")
    assert not at_queries_fits(opt.decoder.layers[-1])
