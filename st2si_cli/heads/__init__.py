"""Heads: what turns the frozen backbone's query features into item scores, one module per kind.

- `base.py`: the contract every kind keeps (`HeadKind`: train on a feature set, load a scorer, rank
  users, top-k with exclusions, extend to new items);
- `ilp.py` (the paper's ILP, random or text init), `adapter.py` (the sequence adapter), `fusion.py`
  (the ILP and adapters mixed): the kinds;
- `registry.py`: the kinds by name, the one dispatch on a head's kind;
- `store.py`: head artifacts in the zoo (store, load, checks; `head_meta`);
- `choice.py`: which head answers for a domain, and the one metrics JSON shape;
- `placement.py`: rows for new items from their text.

To add a kind: its model in `st2si_cli/model/` (an nn.Module), its training on cached features in
`st2si_cli/train/`, its module here (a `HeadKind`), one line in `registry.REGISTRY`, and its choice
and settings in `st2si_cli/cli/adapt_cmd.py`. The head contract test then covers it.
"""
