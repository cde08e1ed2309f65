"""`recommend`'s fast start (backbones/fast_load.py): a plain Llama folder loaded without transformers,
weights memory-mapped, tokenizer from tokenizer.json, gives exactly what the transformers load gives:
the same token IDs, the same features, the same recommendations and scores."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_cli, toy_zoo_with_llama

from st2si_cli.backbones.fast_load import FastTokenizer, load_fast, mmap_safetensors
from st2si_cli.backbones.load import load_backbone
from st2si_cli.data.prepare import load_dataset
from st2si_cli.model.fast import PackedLlama, cat_rows
from st2si_cli.model.samples import build_samples, plan_batches
from st2si_cli.model.text import ItemTokenizer, TextConfig, pad_token_id, query_token_id

TEXTS = [
    "red lamp 3",
    " Toy Story (1995)",
    "Café — naïve façade, 東京 😀",
    "",
    "   spaces   and\ttabs\nnewlines",
    "</s><pad> special-looking text",
    "x" * 300,
]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """The toy dataset, tiny-llama4 and one head on it (fp32 features)."""
    from st2si_cli.adapt import FeatureOptions, adapt
    from st2si_cli.train.head import HeadConfig

    z = toy_zoo_with_llama(tmp_path_factory.mktemp("fastzoo"))
    adapt(
        z,
        "toy",
        backbone="tiny-llama4",
        head_cfg=HeadConfig(max_epochs=1),
        feature_opts=FeatureOptions(dtype="fp32"),
    )
    return z


def folder_of(zoo):
    return zoo.view(zoo.get("tiny-llama4", kind="backbone"))


def test_token_ids_equal_the_transformers_tokenizer(zoo):
    from transformers import AutoTokenizer

    folder = folder_of(zoo)
    fast = FastTokenizer.from_folder(folder)
    assert fast is not None
    slow = AutoTokenizer.from_pretrained(folder)
    for special in (True, False):
        assert (
            fast(TEXTS, add_special_tokens=special)["input_ids"]
            == slow(TEXTS, add_special_tokens=special)["input_ids"]
        )
        for text in TEXTS:
            assert (
                fast(text, add_special_tokens=special)["input_ids"]
                == slow(text, add_special_tokens=special)["input_ids"]
            )
    assert (fast.pad_token_id, fast.eos_token_id, fast.unk_token_id) == (
        slow.pad_token_id,
        slow.eos_token_id,
        slow.unk_token_id,
    )
    assert fast.get_vocab() == slow.get_vocab() and len(fast) == len(slow)
    assert query_token_id(fast, "dot") == query_token_id(slow, "dot")
    assert pad_token_id(fast) == pad_token_id(slow)
    items = load_dataset(zoo, "toy").items
    a, b = (ItemTokenizer.create(t, TextConfig()) for t in (fast, slow))
    assert a.encode_items(items) == b.encode_items(items) and a.prompt_ids == b.prompt_ids


def test_a_tokenizer_transformers_would_change_is_left_to_transformers(zoo, tmp_path):
    folder = tmp_path / "bb"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((folder_of(zoo) / name).read_bytes())
    assert FastTokenizer.from_folder(folder) is not None
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_prefix_space": True}))
    assert FastTokenizer.from_folder(folder) is None
    (folder / "tokenizer_config.json").write_text(
        json.dumps({**cfg, "tokenizer_class": "LlamaTokenizerFast"})
    )
    assert FastTokenizer.from_folder(folder) is None


def test_weights_are_memory_mapped_and_gate_up_is_not_copied(zoo):
    folder = folder_of(zoo)
    weights = mmap_safetensors(folder / "model.safetensors")
    size = (folder / "model.safetensors").stat().st_size
    assert all(t.untyped_storage().nbytes() == size for t in weights.values() if t.numel())
    packed, _ = load_fast(folder, torch.float32, "cpu", "dot")
    for layer in packed.layers:
        assert layer.gate_up.untyped_storage().nbytes() == size  # a view of the file, not a copy
        assert layer.o.untyped_storage().nbytes() == size
    # where the parts are not neighbours, cat_rows copies
    a, b = torch.arange(6.0).view(2, 3), torch.arange(6.0, 12.0).view(2, 3)
    assert torch.equal(cat_rows([a, b]), torch.cat([a, b]))
    flat = torch.arange(12.0)
    v = cat_rows([flat[:6].view(2, 3), flat[6:].view(2, 3)])
    assert v.data_ptr() == flat.data_ptr() and torch.equal(v, flat.view(4, 3))


def _features(model, samples):
    batches = plan_batches([len(s.tokens) for s in samples], 4096, 5)
    out = {}
    with torch.inference_mode():
        for b in batches:
            h = model.hidden_at([samples[i] for i in b])
            out.update(zip(b, h.split([len(samples[i].query_pos) for i in b])))
    return torch.cat([out[i] for i in range(len(samples))])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_features_equal_the_transformers_load_bit_for_bit(zoo, dtype):
    slow = load_backbone(zoo, "tiny-llama4", dtype=dtype)
    fast = load_backbone(zoo, "tiny-llama4", dtype=dtype, inference_only=True)
    assert fast.packed_only and isinstance(fast.model, PackedLlama) and not slow.packed_only
    assert fast.hidden_size == slow.hidden_size and fast.dtype == slow.dtype
    ds = load_dataset(zoo, "toy")
    itok = ItemTokenizer.create(slow.tokenizer, TextConfig())
    samples = build_samples(ds, itok, itok.encode_items(ds.items))
    a, b = _features(slow.st2si(), samples), _features(fast.st2si(), samples)
    assert a.dtype == b.dtype and a.shape == b.shape and a.shape[0] > 30
    assert torch.equal(a, b)


def test_query_new_and_other_devices_use_transformers(zoo):
    assert load_fast(folder_of(zoo), torch.float32, "cpu", "new") is None
    assert load_fast(folder_of(zoo), torch.float32, "cuda", "dot") is None


HISTORIES = "".join(
    json.dumps(line) + "\n"
    for line in [
        {"user": "a", "history": ["1", "2", "3"]},
        {"user": "b", "history": [{"title": "red lamp wooden"}, "7", {"title": "Toy Story (1995)"}]},
        {"user": "c", "history": ["12"]},
    ]
)


def test_recommend_gives_the_same_answers_without_transformers(zoo):
    probe = (
        "import atexit, sys\n"
        "atexit.register(lambda: sys.stderr.write('TRANSFORMERS=%s\\n' % ('transformers' in sys.modules)))\n"
    )
    args = ("recommend", "--domain", "toy", "--user-history", "-", "-k", "5", "--exclude-history")
    fast = run_cli(zoo, *args, input=HISTORIES, prelude=probe)
    slow = run_cli(zoo, *args, input=HISTORIES, prelude=probe, env={"ST2SI_NO_FAST_LOAD": "1"})
    assert fast.returncode == 0 and slow.returncode == 0, fast.stderr + slow.stderr
    assert "TRANSFORMERS=False" in fast.stderr and "TRANSFORMERS=True" in slow.stderr
    rows = [json.loads(x) for x in fast.stdout.splitlines()]
    assert len(rows) == 3 and all(len(r["items"]) == 5 for r in rows)
    assert fast.stdout == slow.stdout  # ids, titles and scores
