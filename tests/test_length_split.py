"""Training forwards split by length: same states and gradients as one padded forward; CPU only."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

from st2si_cli.model.samples import Sample, collate
from st2si_cli.model.st2si import ST2SI, length_split_pays


@pytest.mark.parametrize(
    ("device", "split"),
    [
        ("cpu", True),
        (torch.device("cpu"), True),
        ("cuda", False),
        ("cuda:1", False),
        (torch.device("cuda", 0), False),
    ],
)
def test_only_a_cpu_splits_training_batches_by_length(device, split):
    assert length_split_pays(device) is split


def _module(split: bool) -> ST2SI:
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    backbone = LlamaModel(cfg).float()
    return ST2SI(backbone, 7, pad_id=0, seed=0, split_by_length=split)


def test_a_split_batch_gives_the_states_and_gradients_of_one_padded_forward():
    gen = torch.Generator().manual_seed(1)
    samples = []
    for n in (60, 5, 33, 8, 61, 3):  # long histories mixed with short alignment-like rows: several groups
        tokens = torch.randint(1, 64, (n,), generator=gen).tolist()
        pos = sorted({n - 1, *torch.randint(0, n, (3,), generator=gen).tolist()})
        samples.append(Sample(tokens, pos, [p % 7 for p in pos], [0] * len(pos), 0))
    batch = collate(samples, 0)
    assert ST2SI._length_groups(batch.query_rows, batch.query_cols, len(samples)) is not None

    results = []
    for split in (True, False):
        module = _module(split)
        module.train()
        _, loss = module(batch.input_ids, batch.query_rows, batch.query_cols, batch.targets)
        loss.backward()
        grads = [p.grad.clone() for p in module.parameters()]
        results.append((loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
